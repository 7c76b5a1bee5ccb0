/**
 * The report's header from results files alone (scripts/bench/report.js), without running the
 * bench: the parts table reads each part's shapes from its file.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { testTempDir } from "../helpers/temp-dir";

/* eslint-disable @typescript-eslint/no-var-requires */
const { renderReport } = require("../../scripts/bench/report.js");

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
  expect(partRow("full-kernels.bf16.json", (r) => delete r.shapes, "kernels")).toMatch(/ \| 1\.1b only \(7b not yet\) \|$/);
});
