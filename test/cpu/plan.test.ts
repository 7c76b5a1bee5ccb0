/** The KV plan built from layer_types: targets, diagonal rule, KV layers, cyclic group. */
import { buildPlan, formatLayerTypes, InvalidOptionError, parseLayerTypes } from "../../lib";

const plan = (lt: unknown, n: number, forceNodiag = false, slidingWindow = 0) =>
  buildPlan(parseLayerTypes(lt, n, "config.json"), { forceNodiag, slidingWindow });

test("standard: every layer reads itself, nothing strict, no cycle", () => {
  const p = plan("0_1_2_3", 4);
  expect(p.target).toEqual([0, 1, 2, 3]);
  expect(p.kvLayers).toEqual([0, 1, 2, 3]);
  expect(p.strict).toEqual([false, false, false, false]);
  expect(p.cyclicGroup).toBeNull();
  expect(plan(undefined, 3).target).toEqual([0, 1, 2]);
});

test("LCKV w=2 for 22 layers: two KV layers, middle layers strict, group 1..20", () => {
  const lt = ["0", ...Array(20).fill("20"), "21"].join("_");
  const p = plan(lt, 22);
  expect(p.kvLayers).toEqual([0, 20, 21]);
  expect(p.strict.filter(Boolean).length).toBe(19); // layers 1..19 read layer 20 from below
  expect(p.strict[20]).toBe(false); // layer 20 reads itself, diagonal included
  expect(p.cyclicGroup).toEqual({ low: 1, high: 20 });
});

test("CLA: shared KV downward, nothing strict", () => {
  const p = plan("0_0_2_2", 4);
  expect(p.kvLayers).toEqual([0, 2]);
  expect(p.strict).toEqual([false, false, false, false]);
  expect(p.cyclicGroup).toBeNull();
});

test("sandwich-middle: group ends at the middle target, layers above read it causally", () => {
  const lt = ["0", ...Array(20).fill("10"), "21"].join("_");
  const p = plan(lt, 22);
  expect(p.kvLayers).toEqual([0, 10, 21]);
  expect(p.cyclicGroup).toEqual({ low: 1, high: 10 });
  expect(p.strict.slice(1, 10).every(Boolean)).toBe(true);
  expect(p.strict.slice(10, 21).some(Boolean)).toBe(false);
});

test("force_nodiag makes every layer strict", () => {
  expect(plan("0_1_1_3", 4, true).strict).toEqual([true, true, true, true]);
});

test("sliding windows from the s suffix and from Hugging Face's layer_types", () => {
  const p = plan("0s_3s_3_3", 4, false, 8);
  expect(p.window).toEqual([8, 8, 0, 0]);
  expect(formatLayerTypes(p)).toBe("0s_3s_3_3");
  const hf = plan(["sliding_attention", "full_attention"], 2, false, 4);
  expect(hf.target).toEqual([0, 1]);
  expect(hf.window).toEqual([4, 0]);
  expect(plan([0, 0, 2, 2], 4).kvLayers).toEqual([0, 2]);
});

test("a sliding layer needs a window of at least one token", () => {
  for (const w of [0, -1, 2.5, NaN]) {
    expect(() => plan("0s_1", 2, false, w)).toThrow(expect.objectContaining({ name: "InvalidOptionError", option: "slidingWindow" }));
  }
  expect(() => plan("0s_1", 2, false, 0)).toThrow("option 'slidingWindow': must be an integer >= 1 when a layer slides, got 0");
  expect(plan("0_1", 2, false, 0).window).toEqual([0, 0]); // no sliding layer: the window is unused
});

test("the exported plan functions refuse an argument that is not what they take with a typed error naming it", () => {
  const refused = (f: () => unknown, option: string, detail: RegExp) => {
    let error: unknown;
    try {
      f();
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect((error as InvalidOptionError).option).toBe(option);
    expect((error as InvalidOptionError).detail).toMatch(detail);
  };
  const spec = parseLayerTypes("0_2_2", 3, "config.json");
  refused(() => buildPlan(null as never, { forceNodiag: false, slidingWindow: 0 }), "spec", /must be parseLayerTypes' result, with the arrays target and sliding, got null/);
  refused(() => buildPlan({ target: [0, 1], sliding: [false] }, { forceNodiag: false, slidingWindow: 0 }), "spec", /its sliding is 1 long/);
  refused(() => buildPlan(spec, undefined as never), "opts", /must be \{ forceNodiag, slidingWindow \}, got undefined/);
  refused(() => formatLayerTypes({} as never), "plan", /must be a plan \(buildPlan's result\).*its target is undefined/);
  expect(formatLayerTypes(buildPlan(spec, { forceNodiag: false, slidingWindow: 0 }))).toBe("0_2_2");
});
