// The published declarations, as a project that installs lckv sees them: lib/ is compiled with the
// package's own options (declaration, stripInternal) and a consumer's strict program is checked
// against the emitted .d.ts files, without skipLibCheck.
import * as fs from "node:fs";
import * as path from "node:path";
import * as ts from "typescript";
import { testTempDir } from "../helpers/temp-dir";

const ROOT = path.join(__dirname, "..", "..");
let dir: string;
let dist: string;

/** Writes lib/'s declarations under dir/lckv/dist, as tsc -p tsconfig.json would publish them. */
function emitDeclarations(): void {
  const cfg = ts.getParsedCommandLineOfConfigFile(path.join(ROOT, "tsconfig.json"), {}, { ...ts.sys, onUnRecoverableConfigFileDiagnostic: () => {} });
  if (!cfg) throw new Error("tsconfig.json does not parse");
  const program = ts.createProgram(cfg.fileNames, { ...cfg.options, outDir: dist, emitDeclarationOnly: true, sourceMap: false, declarationMap: false });
  const r = program.emit();
  expect(ts.formatDiagnostics(r.diagnostics, diagnosticHost)).toBe("");
}

const diagnosticHost: ts.FormatDiagnosticsHost = {
  getCanonicalFileName: (f) => f,
  getCurrentDirectory: () => dir,
  getNewLine: () => "\n",
};

/** Type-checks one consumer source against the emitted declarations; the diagnostics' codes and lines. */
function check(source: string): ts.Program {
  const file = path.join(dir, `consumer-${Math.random().toString(36).slice(2)}.ts`);
  fs.writeFileSync(file, source);
  return ts.createProgram([file], {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.Node16,
    moduleResolution: ts.ModuleResolutionKind.Node16,
    lib: ["lib.es2022.d.ts", "lib.esnext.disposable.d.ts"],
    types: ["node"],
    typeRoots: [path.join(ROOT, "node_modules", "@types")],
  });
}

function errors(program: ts.Program): string[] {
  return ts.getPreEmitDiagnostics(program).map((d) => `${d.file ? path.basename(d.file.fileName) : ""} TS${d.code}: ${ts.flattenDiagnosticMessageText(d.messageText, " ")}`);
}

beforeAll(() => {
  dir = testTempDir("lckv-public-types-");
  dist = path.join(dir, "lckv", "dist");
  // The declarations import fastify and the other dependencies: found through node_modules above them.
  fs.symlinkSync(path.join(ROOT, "node_modules"), path.join(dir, "node_modules"), "dir");
  emitDeclarations();
}, 120000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test("a strict program that uses the API type-checks against the published declarations", () => {
  const program = check(`
    import { loadModel, InvalidOptionError, LckvError, ERROR_CODES, type ErrorCode, type CacheStats, type StreamChunk, type GenerateResult } from "./lckv/dist/index.js";
    export async function main(): Promise<void> {
      await using model = await loadModel(undefined, { device: "cpu" });
      const r: GenerateResult = await model.generate("Once", { maxNewTokens: 4 });
      const stream = model.stream("Once", { maxNewTokens: 4 });
      for await (const c of stream) { const chunk: StreamChunk = c; void chunk; }
      using seq = model.createSequence();
      using chat = model.createChatSession({ system: "terse" });
      const stats: CacheStats = model.cacheStats();
      void r; void seq; void chat; void stats.pagesFree; void (await stream.result).timings;
      try { await model.generate("x", { maxNewTokens: -1 }); } catch (e) { if (e instanceof InvalidOptionError) void e.option; }
      // An error's code can be checked against the list of codes, a misspelt one caught by the compiler.
      const full = "LCKV_QUEUE_FULL" satisfies ErrorCode;
      try { await model.generate("x"); } catch (e) { if (e instanceof LckvError && e.code === full && ERROR_CODES.includes(e.code)) return; }
      try { await model.generate("x"); } catch (e) { if (e instanceof LckvError) { const code: ErrorCode = e.code; void code; } }
      // Arrays the library only reads may be readonly: a session's own messages, a const list of stops.
      await model.chat(chat.messages, { stop: ["END", "."] as const });
      await model.chat([{ role: "user", content: "hi" }] as const);
    }
  `);
  expect(errors(program)).toEqual([]);
});

test("an error's code is one of ERROR_CODES to the compiler: a misspelt code does not compile", () => {
  const program = check(`
    import { LckvError } from "./lckv/dist/index.js";
    export function isFull(e: unknown): boolean {
      return e instanceof LckvError && e.code === "LCKV_KV_CACHE_FULLL";
    }
  `);
  const found = errors(program);
  expect(found).toHaveLength(1);
  expect(found[0]).toMatch(/TS2367: This comparison appears to be unintentional/);
});

test("Model, Sequence and ChatSession offer no constructor: they come from loadModel, createSequence and createChatSession", () => {
  // With the internal constructor stripped, a class would declare an implicit public new X() that
  // type-checks and then fails at run time on its missing engine.
  const program = check(`
    import { Model, Sequence, ChatSession } from "./lckv/dist/index.js";
    export const m = new Model();
    export const s = new Sequence();
    export const c = new ChatSession();
  `);
  const found = errors(program);
  expect(found).toHaveLength(3);
  for (const name of ["Model", "Sequence", "ChatSession"]) {
    expect(found).toContainEqual(expect.stringContaining(`TS2673: Constructor of class '${name}' is private`));
  }
});

test("every named type the public API's signatures use is exported, so a consumer can name it", () => {
  const indexProgram = ts.createProgram([path.join(dist, "index.d.ts")], { strict: true, module: ts.ModuleKind.Node16, moduleResolution: ts.ModuleResolutionKind.Node16 });
  const tc = indexProgram.getTypeChecker();
  const sf = indexProgram.getSourceFile(path.join(dist, "index.d.ts"))!;
  const exportsOfIndex = tc.getExportsOfModule(tc.getSymbolAtLocation(sf)!);
  const exported = new Set(exportsOfIndex.map((s) => s.name));
  const unnamed = new Set<string>();
  const seen = new Set<ts.Node>();
  const isPrivate = (m: ts.Node) => ts.canHaveModifiers(m) && (ts.getModifiers(m) ?? []).some((x) => x.kind === ts.SyntaxKind.PrivateKeyword);
  const ours = (d: ts.Declaration) => path.resolve(d.getSourceFile().fileName).startsWith(dist + path.sep);
  const visitDeclaration = (d: ts.Node): void => {
    if (seen.has(d)) return;
    seen.add(d);
    if (ts.isClassDeclaration(d) || ts.isInterfaceDeclaration(d)) {
      for (const h of d.heritageClauses ?? []) visit(h);
      for (const m of d.members) if (!isPrivate(m)) visit(m);
    } else visit(d);
  };
  const visit = (node: ts.Node): void => {
    if (ts.isTypeReferenceNode(node) || ts.isExpressionWithTypeArguments(node)) {
      let s = tc.getSymbolAtLocation(ts.isTypeReferenceNode(node) ? node.typeName : node.expression);
      if (s && s.flags & ts.SymbolFlags.Alias) s = tc.getAliasedSymbol(s);
      for (const d of s?.declarations ?? []) {
        if (!ours(d)) continue;
        if (!exported.has(s!.name)) unnamed.add(`${s!.name} (${path.relative(dist, d.getSourceFile().fileName)})`);
        visitDeclaration(d);
      }
    }
    ts.forEachChild(node, visit);
  };
  for (const s0 of exportsOfIndex) {
    const s = s0.flags & ts.SymbolFlags.Alias ? tc.getAliasedSymbol(s0) : s0;
    for (const d of s.declarations ?? []) visitDeclaration(d);
  }
  expect([...unnamed]).toEqual([]);
});
