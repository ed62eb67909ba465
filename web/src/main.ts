// The scan page: start a scan, watch it live, cancel it, browse recent jobs and the catalog.
// It talks only to the origin that served it, over Connect (@connectrpc/connect-web).

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { ScanService, type Job, type Video } from "./gen/scanjobs/v1/scanjobs_pb.js";
import {
  type CatalogPaging,
  currentToken,
  files,
  firstPage,
  formatCount,
  formatDuration,
  formatRate,
  isActive,
  nextPage,
  pageLoaded,
  pageNumber,
  panelView,
  previousPage,
  RateMeter,
  stateWords,
  upsertJob,
} from "./state.js";

const TOKEN_KEY = "scanjobs.token";
const CATALOG_PAGE_SIZE = 20;
const RECENT_JOBS = 10;

// The token lives in this tab's session storage and travels only in the Authorization header.
const withToken: Interceptor = (next) => async (request) => {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) request.header.set("Authorization", `Bearer ${token}`);
  return next(request);
};

const client = createClient(
  ScanService,
  createConnectTransport({ baseUrl: window.location.origin, interceptors: [withToken] }),
);

function $<T extends HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`missing #${id}`);
  return element as T;
}

const ui = {
  form: $<HTMLFormElement>("scan-form"),
  path: $<HTMLInputElement>("path"),
  scan: $<HTMLButtonElement>("scan"),
  formError: $<HTMLParagraphElement>("form-error"),
  tokenForm: $<HTMLFormElement>("token-form"),
  token: $<HTMLInputElement>("token"),
  panel: $<HTMLElement>("panel"),
  title: $<HTMLElement>("job-path"),
  state: $<HTMLElement>("job-state"),
  phase: $<HTMLElement>("job-phase"),
  bar: $<HTMLProgressElement>("job-progress"),
  counts: $<HTMLElement>("job-counts"),
  rate: $<HTMLElement>("job-rate"),
  current: $<HTMLElement>("job-current"),
  cancel: $<HTMLButtonElement>("cancel"),
  summary: $<HTMLElement>("job-summary"),
  errors: $<HTMLUListElement>("job-errors"),
  jobs: $<HTMLUListElement>("jobs"),
  catalogForm: $<HTMLFormElement>("catalog-form"),
  filter: $<HTMLInputElement>("filter"),
  videos: $<HTMLTableSectionElement>("videos"),
  previous: $<HTMLButtonElement>("previous"),
  next: $<HTMLButtonElement>("next"),
  page: $<HTMLElement>("page"),
};

let watched: { id: string; abort: AbortController } | null = null;
let recent: Job[] = [];
let paging: CatalogPaging = firstPage("");
let retryAfterToken: (() => void) | null = null;

/** Show a failed call: ask for a token when that is what is missing, else the server's words. */
function showError(error: unknown, retry?: () => void): void {
  const failure = ConnectError.from(error);
  if (failure.code === Code.Unauthenticated) {
    retryAfterToken = retry ?? null;
    ui.tokenForm.hidden = false;
    ui.token.focus();
    ui.formError.textContent = "This server needs an access token.";
    return;
  }
  ui.formError.textContent = failure.rawMessage;
}

function render(job: Job, rate: string): void {
  const view = panelView(job);
  ui.panel.hidden = false;
  ui.title.textContent = view.title;
  ui.state.textContent = view.state;
  ui.phase.textContent = view.phase;
  if (view.progress === null) ui.bar.removeAttribute("value");
  else ui.bar.value = view.progress;
  ui.bar.setAttribute("aria-valuetext", `${Math.round((view.progress ?? 0) * 100)}%`);
  ui.counts.textContent = view.counts;
  ui.rate.textContent = rate;
  ui.current.textContent = view.currentFile || "–";
  ui.cancel.disabled = !view.canCancel;
  ui.summary.textContent = view.summary;
  ui.errors.replaceChildren(
    ...view.errors.map((text) => Object.assign(document.createElement("li"), { textContent: text })),
  );
  if (view.moreErrors > 0) {
    const more = document.createElement("li");
    more.textContent = `…and ${formatCount(view.moreErrors)} more`;
    ui.errors.append(more);
  }
}

/** Follow a job until its terminal event, resuming the stream if the connection drops. */
async function watch(job: Job): Promise<void> {
  watched?.abort.abort();
  const abort = new AbortController();
  watched = { id: job.id, abort };
  const meter = new RateMeter();
  let after = 0n;
  let last = job;
  render(job, formatRate(null));
  for (let attempt = 0; attempt < 30 && isActive(last.state); attempt++) {
    try {
      const events = client.watchJob({ jobId: job.id, afterSequence: after }, { signal: abort.signal });
      for await (const event of events) {
        after = event.sequence;
        if (!event.job) continue;
        last = event.job;
        render(last, isActive(last.state) ? formatRate(meter.add(event)) : "–");
        showJob(last);
      }
    } catch (error) {
      if (abort.signal.aborted) return;
      const failure = ConnectError.from(error);
      if (failure.code !== Code.Unavailable) return showError(error, () => void watch(job));
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  if (!isActive(last.state)) void loadCatalog();
}

async function submit(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  ui.formError.textContent = "";
  ui.scan.disabled = true;
  try {
    const job = await client.submitScan({ path: ui.path.value.trim() });
    showJob(job);
    void watch(job);
  } catch (error) {
    showError(error, () => ui.form.requestSubmit());
  } finally {
    ui.scan.disabled = false;
  }
}

async function cancel(): Promise<void> {
  if (!watched) return;
  ui.cancel.disabled = true;
  try {
    showJob(await client.cancelJob({ jobId: watched.id }));
  } catch (error) {
    showError(error);
  }
}

function showJob(job: Job): void {
  recent = upsertJob(recent, job, RECENT_JOBS);
  renderJobs();
}

function renderJobs(): void {
  ui.jobs.replaceChildren(
    ...recent.map((job) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = job.path;
      button.setAttribute("aria-label", `Show the job for ${job.path}, ${stateWords(job.state)}`);
      button.addEventListener("click", () => void watch(job));
      const state = document.createElement("span");
      state.className = `state state-${stateWords(job.state).toLowerCase().replace(" ", "-")}`;
      state.textContent = `${stateWords(job.state)} · ${files(job.progress?.filesDone ?? 0n)}`;
      item.append(button, " ", state);
      return item;
    }),
  );
}

async function loadJobs(): Promise<void> {
  try {
    const reply = await client.listJobs({ pageSize: RECENT_JOBS });
    recent = reply.jobs;
    renderJobs();
  } catch (error) {
    showError(error, () => void loadJobs());
  }
}

function videoRow(video: Video): HTMLTableRowElement {
  const row = document.createElement("tr");
  const cells = [
    video.path,
    video.duration ? formatDuration(Number(video.duration.seconds) + video.duration.nanos / 1e9) : "–",
    video.width ? `${video.width}×${video.height}` : "–",
    video.videoCodec || "–",
    `${formatCount(video.sizeBytes)} B`,
  ];
  row.append(...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
  return row;
}

async function loadCatalog(): Promise<void> {
  try {
    const reply = await client.listVideos({
      pathPrefix: paging.prefix,
      pageSize: CATALOG_PAGE_SIZE,
      pageToken: currentToken(paging),
    });
    paging = pageLoaded(paging, reply.nextPageToken);
    ui.videos.replaceChildren(...reply.videos.map(videoRow));
    if (reply.videos.length === 0) {
      const row = document.createElement("tr");
      row.append(Object.assign(document.createElement("td"), { colSpan: 5, textContent: "No videos." }));
      ui.videos.append(row);
    }
  } catch (error) {
    showError(error, () => void loadCatalog());
  }
  ui.previous.disabled = pageNumber(paging) < 2;
  ui.next.disabled = !paging.next;
  ui.page.textContent = `Page ${pageNumber(paging)}`;
}

function useToken(event: SubmitEvent): void {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, ui.token.value.trim());
  ui.token.value = "";
  ui.tokenForm.hidden = true;
  ui.formError.textContent = "";
  const retry = retryAfterToken;
  retryAfterToken = null;
  void loadJobs();
  void loadCatalog();
  retry?.();
}

ui.form.addEventListener("submit", (event) => void submit(event));
ui.cancel.addEventListener("click", () => void cancel());
ui.tokenForm.addEventListener("submit", useToken);
ui.catalogForm.addEventListener("submit", (event) => {
  event.preventDefault();
  paging = firstPage(ui.filter.value);
  void loadCatalog();
});
ui.previous.addEventListener("click", () => {
  paging = previousPage(paging);
  void loadCatalog();
});
ui.next.addEventListener("click", () => {
  paging = nextPage(paging);
  void loadCatalog();
});
// Jobs started elsewhere (the CLI, another tab) appear within a few seconds.
setInterval(() => {
  if (document.visibilityState === "visible" && ui.tokenForm.hidden) void loadJobs();
}, 3000);
void loadJobs();
void loadCatalog();
