/**
 * The error codes' one table (lib/error-codes.json) against what comes from it: the engine's
 * constants (native/engine/error_codes.h) and the TypeScript list (lib/error-codes.ts) hold the
 * same codes, every code the sources name is in the table, and fromNative gives each engine code
 * its typed error. The comparisons are also shown failing on lists that disagree.
 */
import * as fs from "node:fs";
import * as path from "node:path";

import { ENGINE_ERROR_CODES, ERROR_CODES } from "../../lib/error-codes";
import { fromNative, LckvError } from "../../lib/errors";

// eslint-disable-next-line @typescript-eslint/no-require-imports
const gen = require("../../scripts/error-codes.js") as {
  CPP_HEADER: string;
  readTable(): { code: string; engine: boolean; meaning: string }[];
  renderAll(): Record<string, string>;
  cppConstantName(code: string): string;
  parseCppCodes(text: string): { constant: string; code: string }[];
  compareCodeLists(cppCodes: string[], tsCodes: string[]): string[];
  firstDifference(expected: string, actual: string): { line: number; expected: string; actual: string } | null;
};

const root = path.join(__dirname, "..", "..");
const read = (file: string) => fs.readFileSync(path.join(root, file), "utf8");
const table = gen.readTable();
const cppCodes = gen.parseCppCodes(read(gen.CPP_HEADER));

test.each(Object.entries(gen.renderAll()))("%s is what scripts/error-codes.js makes of the table", (file, expected) => {
  // null, or where it differs: then run node scripts/error-codes.js
  expect(gen.firstDifference(expected, read(file))).toBeNull();
});

test("firstDifference finds the line where a file differs", () => {
  expect(gen.firstDifference("a\nb\nc\n", "a\nB\nc\n")).toEqual({ line: 2, expected: "b", actual: "B" });
  expect(gen.firstDifference("a\nb", "a")).toEqual({ line: 2, expected: "b", actual: "(end of file)" });
  expect(gen.firstDifference("a\n", "a\n")).toBeNull();
});

test("the C++ header and the TypeScript list hold the same engine codes, each constant named for its code", () => {
  expect(gen.compareCodeLists(cppCodes.map((c) => c.code), [...ENGINE_ERROR_CODES])).toEqual([]);
  expect(cppCodes.length).toBeGreaterThanOrEqual(13);
  for (const c of cppCodes) expect(c.constant).toBe(gen.cppConstantName(c.code));
  expect(gen.cppConstantName("LCKV_KV_CACHE_FULL")).toBe("kErrKvCacheFull");
  expect(gen.cppConstantName("LCKV_IO")).toBe("kErrIo");
});

test("compareCodeLists reports lists that disagree", () => {
  const cpp = ["LCKV_IO", "LCKV_CUDA", "LCKV_BUSY", "LCKV_BUSY"];
  const ts = ["LCKV_IO", "LCKV_CUDA", "LCKV_INTERNAL"];
  expect(gen.compareCodeLists(cpp, ts).sort()).toEqual(
    [
      "LCKV_BUSY: twice in the C++ header",
      "LCKV_BUSY: in the C++ header, not in the TypeScript list",
      "LCKV_INTERNAL: in the TypeScript list, not in the C++ header",
    ].sort(),
  );
  // the engine's codes against a list that lacks one of them
  const engine = [...ENGINE_ERROR_CODES] as string[];
  expect(gen.compareCodeLists(engine, engine.filter((c) => c !== "LCKV_CUDA"))).toEqual([
    "LCKV_CUDA: in the C++ header, not in the TypeScript list",
  ]);
});

test("the TypeScript lists are the table's codes, the engine's those marked engine", () => {
  expect([...ERROR_CODES]).toEqual(table.map((c) => c.code));
  expect([...ENGINE_ERROR_CODES]).toEqual(table.filter((c) => c.engine).map((c) => c.code));
  for (const code of ["LCKV_CUDA", "LCKV_DEVICE_UNAVAILABLE", "LCKV_INTERNAL", "LCKV_BUSY"]) {
    expect(ENGINE_ERROR_CODES).toContain(code);
  }
});

// Every "LCKV_..." string in the sources, by file (the names of environment variables read
// with getenv are settings, not codes).
function codeLiterals(dir: string, ext: RegExp): { file: string; code: string }[] {
  const found: { file: string; code: string }[] = [];
  for (const entry of fs.readdirSync(path.join(root, dir), { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !ext.test(entry.name)) continue;
    const file = path.relative(root, path.join(entry.parentPath, entry.name));
    for (const m of read(file).matchAll(/(getenv\(\s*)?"(LCKV_[A-Z0-9_]+)"/g)) if (!m[1]) found.push({ file, code: m[2] });
  }
  return found;
}

test("the engine's sources name codes only through error_codes.h's constants", () => {
  const literals = codeLiterals("native", /\.(h|cpp|cu|cuh)$/);
  const header = "native/engine/error_codes.h";
  expect(literals.filter((l) => l.file === header).map((l) => l.code).sort()).toEqual([...ENGINE_ERROR_CODES].sort());
  expect(literals.filter((l) => l.file !== header)).toEqual([]);
});

test("every code lib/ names is in the table", () => {
  const literals = codeLiterals("lib", /\.ts$/);
  const codes = new Set<string>(ERROR_CODES);
  expect(literals.filter((l) => !codes.has(l.code))).toEqual([]);
});

test.each([...ENGINE_ERROR_CODES])("fromNative gives %s its typed error", (code) => {
  const native = Object.assign(new Error(`something about ${code}`), { code });
  const e = fromNative(native);
  expect(e).toBeInstanceOf(LckvError);
  expect(Object.getPrototypeOf(e)).not.toBe(LckvError.prototype);
  expect(e.name).not.toBe("LckvError");
  expect(e.code).toBe(code);
  expect(e.message).toContain(code === "LCKV_DISPOSED" ? "something about" : `something about ${code}`);
});

test("fromNative: an error without a code, or with one not in the table, is internal (the code said in its message)", () => {
  const plain = new TypeError("not a number");
  const internal = fromNative(plain);
  expect(internal.name).toBe("InternalError");
  expect(internal.code).toBe("LCKV_INTERNAL");
  expect(internal.cause).toBe(plain);
  const odd = Object.assign(new Error("x"), { code: "ENOENT" });
  const unknown = fromNative(odd);
  expect(unknown).toBeInstanceOf(LckvError);
  expect(unknown.name).toBe("InternalError");
  expect(unknown.code).toBe("LCKV_INTERNAL");
  expect(unknown.message).toBe("x (code ENOENT)");
  expect(unknown.cause).toBe(odd);
});

test("the package exports every error class, and not fromNative (the addon's errors' mapping, internal)", () => {
  const errors = require("../../lib/errors") as Record<string, unknown>;
  const lib = require("../../lib") as Record<string, unknown>;
  const classes = Object.keys(errors).filter((k) => typeof errors[k] === "function" && (errors[k] as { prototype?: unknown }).prototype instanceof Error);
  expect(classes.length).toBeGreaterThan(15);
  for (const name of classes) expect(lib[name]).toBe(errors[name]);
  expect(lib.fromNative).toBeUndefined();
});
