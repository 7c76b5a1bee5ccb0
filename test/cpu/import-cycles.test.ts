// lib/ has no import cycle, type-only imports included: a cycle between modules makes their
// order of evaluation matter and ties their types together, so each module is kept to one
// direction of dependency (Model -> Sequence -> EngineContext, never back). The graph comes from
// the compiler's own scan of each source (imports, `import type`, `export ... from`, require and
// import() alike), and a depth-first search looks for a path that comes back to where it started.
import * as fs from "node:fs";
import * as path from "node:path";
import * as ts from "typescript";

const LIB = path.join(__dirname, "..", "..", "lib");

/** The relative module specifiers a source imports or re-exports, in any form. */
function relativeImports(source: string): string[] {
  return ts
    .preProcessFile(source, true, true)
    .importedFiles.map((f) => f.fileName)
    .filter((name) => name.startsWith("./") || name.startsWith("../"));
}

/** Every .ts file under dir, as paths relative to root without the extension. */
function modulesUnder(root: string, dir = root): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const full = path.join(dir, e.name);
    if (e.isDirectory()) return modulesUnder(root, full);
    return e.isFile() && e.name.endsWith(".ts") && !e.name.endsWith(".d.ts") ? [path.relative(root, full).slice(0, -3).split(path.sep).join("/")] : [];
  });
}

/** lib/'s module graph: each module (its path under lib/, no extension) -> the lib modules it imports. */
function libGraph(): Map<string, string[]> {
  const modules = new Set(modulesUnder(LIB));
  const graph = new Map<string, string[]>();
  for (const m of modules) {
    const source = fs.readFileSync(path.join(LIB, `${m}.ts`), "utf8");
    const deps = relativeImports(source).map((spec) => {
      const target = path.posix.normalize(path.posix.join(path.posix.dirname(m), spec));
      return modules.has(target) ? target : `${target}/index`;
    });
    graph.set(m, [...new Set(deps.filter((d) => modules.has(d)))]);
  }
  return graph;
}

/** A cycle of the graph as the modules along it, the first repeated at the end; null when there is none. */
function findCycle(graph: ReadonlyMap<string, readonly string[]>): string[] | null {
  const done = new Set<string>();
  const onPath = new Set<string>();
  const pathStack: string[] = [];
  const visit = (node: string): string[] | null => {
    if (onPath.has(node)) return [...pathStack.slice(pathStack.indexOf(node)), node];
    if (done.has(node)) return null;
    onPath.add(node);
    pathStack.push(node);
    for (const next of graph.get(node) ?? []) {
      const cycle = visit(next);
      if (cycle) return cycle;
    }
    pathStack.pop();
    onPath.delete(node);
    done.add(node);
    return null;
  };
  for (const node of graph.keys()) {
    const cycle = visit(node);
    if (cycle) return cycle;
  }
  return null;
}

/** Whether each step of `cycle` is an edge of the graph and it ends where it began. */
function isCycleOf(graph: ReadonlyMap<string, readonly string[]>, cycle: string[]): boolean {
  return cycle.length >= 2 && cycle[0] === cycle[cycle.length - 1] && cycle.slice(1).every((to, i) => (graph.get(cycle[i]) ?? []).includes(to));
}

describe("the import-cycle detector", () => {
  test("finds a cycle of three modules reached from outside it", () => {
    const graph = new Map([
      ["entry", ["a"]],
      ["a", ["b"]],
      ["b", ["c", "leaf"]],
      ["c", ["a"]],
      ["leaf", []],
    ]);
    const cycle = findCycle(graph);
    expect(cycle).not.toBeNull();
    expect(isCycleOf(graph, cycle!)).toBe(true);
    expect(new Set(cycle)).toEqual(new Set(["a", "b", "c"]));
  });

  test("finds a module that imports itself", () => {
    expect(findCycle(new Map([["a", ["a"]]]))).toEqual(["a", "a"]);
  });

  test("finds no cycle where two paths meet again (a diamond)", () => {
    expect(findCycle(new Map([["a", ["b", "c"]], ["b", ["d"]], ["c", ["d"]], ["d", []]]))).toBeNull();
  });

  test("reads every form of import, type-only ones included, and no comment or string", () => {
    const source = [
      'import type { A } from "./a";',
      "import {",
      "  B,",
      "  type C,",
      '} from "./b";',
      'export * from "./c";',
      'export type { D } from "./d";',
      'import "./e";',
      'type F = import("./f").F;',
      'export { G } from "../g";',
      'import { H } from "commander";',
      '// import { X } from "./in-a-comment";',
      'const s = "import { Y } from \\"./in-a-string\\"";',
    ].join("\n");
    expect(relativeImports(source)).toEqual(["./a", "./b", "./c", "./d", "./e", "./f", "../g"]);
  });
});

describe("lib/", () => {
  const graph = libGraph();

  test("the graph holds lib's modules and their type-only imports", () => {
    expect(graph.size).toBeGreaterThan(10);
    expect(graph.get("index")).toEqual(expect.arrayContaining(["model", "load-model", "sequence", "errors"]));
    // prefix-cache.ts imports Sequence as a type only.
    expect(graph.get("prefix-cache")).toContain("sequence");
  });

  test("has no import cycle", () => {
    const cycle = findCycle(graph);
    expect(cycle === null ? "no cycle" : cycle.join(" -> ")).toBe("no cycle");
  });

  test("a cycle would be found: Sequence's context importing Model back", () => {
    const withBackEdge = new Map(graph);
    withBackEdge.set("engine-context", [...(graph.get("engine-context") ?? []), "model"]);
    const cycle = findCycle(withBackEdge);
    expect(cycle).not.toBeNull();
    expect(isCycleOf(withBackEdge, cycle!)).toBe(true);
    expect(cycle).toContain("model");
  });
});
