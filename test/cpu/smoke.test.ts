import { loadModel } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";

test("smoke", async () => {
  for (const lt of [undefined, "0_3_3_3", "0_0_2_2"]) {
    const dir = writeTinyModel({ layerTypes: lt });
    const m = await loadModel(dir, { device: "cpu" });
    const ids = [1, 5, 9, 3, 7, 2, 8, 11, 4, 6];
    const a = await m.forward(ids, { prefill: "sequential" });
    const b = await m.forward(ids);
    const c = await m.forward(ids, { prefill: "iterative", prefillPasses: 3 });
    let d1 = 0, d2 = 0;
    for (let i = 0; i < a.logits.length; i++) { d1 = Math.max(d1, Math.abs(a.logits[i] - b.logits[i])); d2 = Math.max(d2, Math.abs(a.logits[i] - c.logits[i])); }
    const g = await m.generate(ids, { maxNewTokens: 10 });
    console.log(lt, "fixedpoint passes", b.passes, "diff seq-fp", d1, "diff seq-iter", d2, g.tokens.join(","), g.finishReason);
    await m.dispose();
  }
});
