import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import {
  FileErrorSchema,
  type Job,
  JobEventSchema,
  JobProgressSchema,
  JobSchema,
  JobState,
  ScanPhase,
  ScanResultSchema,
} from "./gen/scanjobs/v1/scanjobs_pb.js";
import {
  currentToken,
  firstPage,
  formatDuration,
  formatRate,
  isActive,
  nextPage,
  pageLoaded,
  pageNumber,
  panelView,
  previousPage,
  RateMeter,
  upsertJob,
} from "./state.js";

function job(state: JobState, extra: MessageInitShape<typeof JobSchema> = {}): Job {
  return create(JobSchema, {
    id: "j1",
    path: "/media/films",
    state,
    progress: create(JobProgressSchema, {
      phase: ScanPhase.PROBING,
      filesFound: 3000n,
      filesDone: 1234n,
      fraction: 1234 / 3000,
      currentPath: "/media/films/a.mp4",
    }),
    result: create(ScanResultSchema, { added: 1200n, unchanged: 30n, failed: 4n, errorCount: 4n }),
    ...extra,
  });
}

describe("the live panel", () => {
  it("enables Cancel only while a job is pending or running", () => {
    expect(panelView(job(JobState.PENDING)).canCancel).toBe(true);
    expect(panelView(job(JobState.RUNNING)).canCancel).toBe(true);
    for (const ended of [JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED]) {
      expect(panelView(job(ended)).canCancel).toBe(false);
      expect(isActive(ended)).toBe(false);
    }
  });

  it("shows a requested cancel as Cancelling and disables Cancel", () => {
    const view = panelView(job(JobState.RUNNING, { cancelRequested: true }));
    expect(view.state).toBe("Cancelling…");
    expect(view.canCancel).toBe(false);
  });

  it("shows progress, phase, counts and the current file while running", () => {
    const view = panelView(job(JobState.RUNNING));
    expect(view.progress).toBeCloseTo(0.411, 3);
    expect(view.phase).toBe("Probing files");
    expect(view.counts).toBe("1,234 of 3,000 files done");
    expect(view.currentFile).toBe("/media/films/a.mp4");
    expect(view.summary).toBe("");
  });

  it("leaves the bar indeterminate while files are still being discovered", () => {
    const discovering = job(JobState.RUNNING);
    discovering.progress!.phase = ScanPhase.DISCOVERING;
    expect(panelView(discovering).progress).toBeNull();
  });

  it("says how a cancelled job ended, with its partial counts", () => {
    const view = panelView(job(JobState.CANCELLED));
    expect(view.state).toBe("Cancelled");
    expect(view.summary).toBe(
      "Cancelled after 1,234 of 3,000 files: 1,200 added, 0 updated, 30 unchanged, 4 failed.",
    );
    expect(view.currentFile).toBe("");
  });

  it("says why a failed or timed-out job ended", () => {
    expect(panelView(job(JobState.TIMEOUT, { error: "ran longer than 60 s" })).summary).toMatch(
      /^Timed out \(ran longer than 60 s\) after 1,234 of 3,000 files/,
    );
  });

  it("fills the bar for a completed job", () => {
    const view = panelView(job(JobState.COMPLETED));
    expect(view.progress).toBe(1);
    expect(view.summary).toBe("Completed: 3,000 files, 1,200 added, 0 updated, 30 unchanged, 4 failed.");
  });

  it("lists the first errors and counts the rest", () => {
    const failed = job(JobState.COMPLETED);
    failed.result!.errors = [create(FileErrorSchema, { path: "/m/x.mp4", message: "not a video" })];
    failed.result!.errorCount = 5n;
    const view = panelView(failed);
    expect(view.errors).toEqual(["/m/x.mp4: not a video"]);
    expect(view.moreErrors).toBe(4);
  });
});

describe("the rate", () => {
  const event = (atMs: number, done: bigint) =>
    create(JobEventSchema, {
      eventTime: timestampFromMs(atMs),
      job: create(JobSchema, { progress: create(JobProgressSchema, { filesDone: done }) }),
    });

  it("is unknown until two events arrived, then files per second over the window", () => {
    const meter = new RateMeter(5000);
    expect(meter.add(event(0, 0n))).toBeNull();
    expect(meter.add(event(1000, 100n))).toBe(100);
    expect(meter.add(event(2000, 300n))).toBe(150);
    expect(formatRate(meter.rate())).toBe("150 files/s");
    expect(formatRate(null)).toBe("–");
  });

  it("forgets samples older than its window", () => {
    const meter = new RateMeter(1000);
    meter.add(event(0, 0n));
    meter.add(event(10_000, 10n));
    expect(meter.add(event(10_500, 60n))).toBe(100);
  });
});

describe("durations", () => {
  it("read as m:ss, or h:mm:ss from an hour on", () => {
    expect(formatDuration(0.04)).toBe("0:00");
    expect(formatDuration(65.6)).toBe("1:06");
    expect(formatDuration(3 * 3600 + 5 * 60 + 7)).toBe("3:05:07");
  });
});

describe("the recent jobs list", () => {
  it("replaces a known job in place and puts a new one first, up to the limit", () => {
    const a = job(JobState.RUNNING, { id: "a" });
    const b = job(JobState.PENDING, { id: "b" });
    let list = upsertJob([], a);
    list = upsertJob(list, b);
    expect(list.map((j) => j.id)).toEqual(["b", "a"]);
    list = upsertJob(list, job(JobState.CANCELLED, { id: "a" }));
    expect(list.map((j) => [j.id, j.state])).toEqual([
      ["b", JobState.PENDING],
      ["a", JobState.CANCELLED],
    ]);
    expect(upsertJob(list, job(JobState.PENDING, { id: "c" }), 2).map((j) => j.id)).toEqual(["c", "b"]);
  });
});

describe("catalog paging", () => {
  it("walks forward with the server's tokens and back again", () => {
    let paging = firstPage("  /media/films ");
    expect(paging.prefix).toBe("/media/films");
    expect(currentToken(paging)).toBe("");
    expect(nextPage(paging)).toBe(paging); // no next page yet
    paging = pageLoaded(paging, "t2");
    paging = nextPage(paging);
    expect([currentToken(paging), pageNumber(paging)]).toEqual(["t2", 2]);
    paging = pageLoaded(paging, "");
    expect(nextPage(paging)).toBe(paging); // the last page
    paging = previousPage(paging);
    expect([currentToken(paging), pageNumber(paging)]).toEqual(["", 1]);
    expect(previousPage(paging)).toBe(paging);
  });
});
