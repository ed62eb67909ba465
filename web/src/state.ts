// The page's state logic, free of the DOM and the network so that vitest can check it:
// what the live panel shows for a job, the scan rate, the recent-jobs list and catalog paging.

import { timestampMs } from "@bufbuild/protobuf/wkt";
import { JobState, ScanPhase, type Job, type JobEvent } from "./gen/scanjobs/v1/scanjobs_pb.js";

const STATE_WORDS: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "Unknown",
  [JobState.PENDING]: "Pending",
  [JobState.RUNNING]: "Running",
  [JobState.COMPLETED]: "Completed",
  [JobState.FAILED]: "Failed",
  [JobState.TIMEOUT]: "Timed out",
  [JobState.CANCELLED]: "Cancelled",
};

const PHASE_WORDS: Record<ScanPhase, string> = {
  [ScanPhase.UNSPECIFIED]: "Waiting",
  [ScanPhase.DISCOVERING]: "Discovering files",
  [ScanPhase.PROBING]: "Probing files",
};

/** The state of a job in words, as the page shows it ("Cancelled", "Timed out"…). */
export function stateWords(state: JobState): string {
  return STATE_WORDS[state] ?? "Unknown";
}

/** True while the job may still change: the Cancel button is enabled then. */
export function isActive(state: JobState): boolean {
  return state === JobState.PENDING || state === JobState.RUNNING;
}

const count = new Intl.NumberFormat("en-US");

/** A count as the page writes it: 12,345. */
export function formatCount(value: bigint | number): string {
  return count.format(typeof value === "bigint" ? Number(value) : value);
}

/** "1 file", "12,345 files". */
export function files(value: bigint | number): string {
  return `${formatCount(value)} ${Number(value) === 1 ? "file" : "files"}`;
}

/** Everything the live panel shows for one job snapshot. */
export interface PanelView {
  title: string;
  state: string;
  phase: string;
  /** 0..1, or null while the total is still unknown (the bar is then indeterminate). */
  progress: number | null;
  counts: string;
  currentFile: string;
  canCancel: boolean;
  /** The final state in words with the partial counts; empty while the job runs. */
  summary: string;
  /** The first per-file errors, as "path: message". */
  errors: string[];
  moreErrors: number;
}

export function panelView(job: Job): PanelView {
  const progress = job.progress;
  const done = progress?.filesDone ?? 0n;
  const found = progress?.filesFound ?? 0n;
  const discovering = progress?.phase === ScanPhase.DISCOVERING;
  const active = isActive(job.state);
  let fraction: number | null = progress?.fraction ?? 0;
  if (!active && job.state === JobState.COMPLETED) fraction = 1;
  else if (active && discovering) fraction = null;
  const errors = (job.result?.errors ?? []).map((e) => `${e.path}: ${e.message}`);
  return {
    title: job.path,
    state: job.cancelRequested && active ? "Cancelling…" : stateWords(job.state),
    phase: active ? PHASE_WORDS[progress?.phase ?? ScanPhase.UNSPECIFIED] : "Ended",
    progress: fraction,
    counts: `${formatCount(done)} of ${files(found)} done`,
    currentFile: active ? (progress?.currentPath ?? "") : "",
    canCancel: active && !job.cancelRequested,
    summary: active ? "" : summary(job),
    errors,
    moreErrors: Math.max(0, Number(job.result?.errorCount ?? 0n) - errors.length),
  };
}

/** "Cancelled after 1,234 of 3,000 files: 1,200 added, 0 updated, 30 unchanged, 4 failed." */
export function summary(job: Job): string {
  const r = job.result;
  const done = formatCount(job.progress?.filesDone ?? 0n);
  const found = files(job.progress?.filesFound ?? 0n);
  const parts = [
    `${formatCount(r?.added ?? 0n)} added`,
    `${formatCount(r?.updated ?? 0n)} updated`,
    `${formatCount(r?.unchanged ?? 0n)} unchanged`,
    `${formatCount(r?.failed ?? 0n)} failed`,
  ].join(", ");
  const words = stateWords(job.state);
  const reason = job.error ? ` (${job.error})` : "";
  if (job.state === JobState.COMPLETED) {
    return `${words}: ${found}, ${parts}.`;
  }
  return `${words}${reason} after ${done} of ${found}: ${parts}.`;
}

/** A duration as h:mm:ss or m:ss, to the nearest second. */
export function formatDuration(seconds: number): string {
  const total = Math.round(seconds);
  const [h, m, s] = [Math.floor(total / 3600), Math.floor(total / 60) % 60, total % 60];
  const mmss = `${String(m).padStart(h ? 2 : 1, "0")}:${String(s).padStart(2, "0")}`;
  return h ? `${h}:${mmss}` : mmss;
}

/** Files per second over the last few seconds of events, from the server's event times. */
export class RateMeter {
  private samples: { atMs: number; done: number }[] = [];

  constructor(private readonly windowMs = 5000) {}

  /** Add an event; returns the rate in files per second, or null until two samples exist. */
  add(event: JobEvent): number | null {
    const atMs = event.eventTime ? timestampMs(event.eventTime) : Date.now();
    const done = Number(event.job?.progress?.filesDone ?? 0n);
    this.samples.push({ atMs, done });
    while (this.samples.length > 2 && atMs - this.samples[0].atMs > this.windowMs) {
      this.samples.shift();
    }
    return this.rate();
  }

  rate(): number | null {
    if (this.samples.length < 2) return null;
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    const seconds = (last.atMs - first.atMs) / 1000;
    return seconds > 0 ? Math.max(0, (last.done - first.done) / seconds) : null;
  }
}

/** "123 files/s", or "–" when unknown. */
export function formatRate(rate: number | null): string {
  return rate === null ? "–" : `${formatCount(Math.round(rate))} files/s`;
}

/** The recent-jobs list with ``job`` in it: replaced in place if known, else first. */
export function upsertJob(jobs: readonly Job[], job: Job, limit = 10): Job[] {
  const index = jobs.findIndex((j) => j.id === job.id);
  if (index >= 0) {
    const copy = jobs.slice();
    copy[index] = job;
    return copy;
  }
  return [job, ...jobs].slice(0, limit);
}

/** Paging through the catalog: the tokens of the pages behind, and the next page's token. */
export interface CatalogPaging {
  prefix: string;
  /** page_token of every page shown so far; the last one is the current page's. */
  tokens: string[];
  next: string;
}

export function firstPage(prefix: string): CatalogPaging {
  return { prefix: prefix.trim(), tokens: [""], next: "" };
}

/** The paging after a page arrived with ``nextPageToken``. */
export function pageLoaded(paging: CatalogPaging, nextPageToken: string): CatalogPaging {
  return { ...paging, next: nextPageToken };
}

export function nextPage(paging: CatalogPaging): CatalogPaging {
  if (!paging.next) return paging;
  return { ...paging, tokens: [...paging.tokens, paging.next], next: "" };
}

export function previousPage(paging: CatalogPaging): CatalogPaging {
  if (paging.tokens.length < 2) return paging;
  return { ...paging, tokens: paging.tokens.slice(0, -1), next: "" };
}

export function currentToken(paging: CatalogPaging): string {
  return paging.tokens[paging.tokens.length - 1];
}

export function pageNumber(paging: CatalogPaging): number {
  return paging.tokens.length;
}
