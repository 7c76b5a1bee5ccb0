/**
 * The report's header from results files alone (scripts/bench/report.js), without running the
 * bench: the parts table reads each part's shapes from its file.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { testTempDir } from "../helpers/temp-dir";

/* eslint-disable @typescript-eslint/no-var-requires */
const { renderReport } = require("../../scripts/bench/report.js");
const { resultsFileName } = require("../../scripts/bench/parts.js");

const committed = path.join(__dirname, "..", "..", "docs", "bench");

/** The parts table's row of `part` in the report rendered from the committed results, `edit` applied to one file. */
function partRow(file: string, edit: (r: Record<string, any>) => void, part: string): string {
  const docs = testTempDir("lckv-bench-report-");
  try {
    fs.mkdirSync(path.join(docs, "bench"));
    for (const f of fs.readdirSync(committed).filter((x) => x.endsWith(".json"))) {
      const r = JSON.parse(fs.readFileSync(path.join(committed, f), "utf8"));
      if (f === file) edit(r);
      fs.writeFileSync(path.join(docs, "bench", f), JSON.stringify(r));
    }
    renderReport(docs);
    return fs.readFileSync(path.join(docs, "benchmarks.md"), "utf8").split("\n").find((l) => l.startsWith(`| \`${part}\` |`))!;
  } finally {
    fs.rmSync(docs, { recursive: true, force: true });
  }
}

test("a part's file written before results recorded their shapes counts as the 1.1B shape, as the header's shape list reads it", () => {
  expect(partRow("full-peers.bf16.json", (r) => delete r.shapes, "peers")).toMatch(/ \| yes \|$/);
  expect(partRow("full-kernels-1.1b.bf16.json", (r) => delete r.shapes, "kernels")).toMatch(/ \| 1\.1b only \(7b not yet\) \|$/);
});

test("a part run at one of its shapes writes a file of its own, which the parts table joins with the part's other shape", () => {
  expect(resultsFileName({ part: "kernels", only: [2, 3, 5, 8], shapes: ["1.1b", "7b"], kvDtypes: ["bf16"] })).toBe("full-kernels.bf16.json");
  expect(resultsFileName({ part: "kernels", only: [2, 3, 5, 8], shapes: ["7b"], kvDtypes: ["bf16"] })).toBe("full-kernels-7b.bf16.json");
  expect(resultsFileName({ part: "7b-a", only: [1], shapes: ["7b"], kvDtypes: null })).toBe("full-7b-a.json");
  expect(resultsFileName({ part: undefined, only: [7], shapes: ["1.1b"], kvDtypes: null })).toBe("full-custom-7-1.1b.json");
  // The committed 1.1B file beside a copy of it relabelled as the 7B run: both shapes count.
  const docs = testTempDir("lckv-bench-report-");
  try {
    fs.mkdirSync(path.join(docs, "bench"));
    for (const f of fs.readdirSync(committed).filter((x) => x.endsWith(".json"))) fs.copyFileSync(path.join(committed, f), path.join(docs, "bench", f));
    const r = JSON.parse(fs.readFileSync(path.join(committed, "full-kernels-1.1b.bf16.json"), "utf8"));
    r.shapes = Object.fromEntries(Object.entries(r.shapes).map(([, v]) => ["7b", v]));
    fs.writeFileSync(path.join(docs, "bench", "full-kernels-7b.bf16.json"), JSON.stringify(r));
    renderReport(docs);
    const row = fs.readFileSync(path.join(docs, "benchmarks.md"), "utf8").split("\n").find((l) => l.startsWith("| `kernels` |"))!;
    expect(row).toMatch(/ \| yes \|$/);
  } finally {
    fs.rmSync(docs, { recursive: true, force: true });
  }
});
