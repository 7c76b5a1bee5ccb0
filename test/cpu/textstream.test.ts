// TextStream: text deltas from a growing list of token ids, decoded incrementally.
import { TextStream } from "../../lib/textstream";

// Byte-level tokens: id = one UTF-8 byte; an incomplete character decodes as U+FFFD, as a real
// byte-level BPE tokenizer shows it.
const utf8 = new TextDecoder();
const decodeBytes = (ids: number[]) => utf8.decode(Uint8Array.from(ids));
const bytesOf = (s: string) => [...new TextEncoder().encode(s)];

function streamAll(ids: number[], stops: string[], decode = decodeBytes) {
  const s = new TextStream(decode, stops);
  const deltas: string[] = [];
  for (let n = 1; n <= ids.length && !s.stopped; n++) deltas.push(s.push(ids.slice(0, n)));
  deltas.push(s.flush());
  return { s, deltas };
}

test("streamed deltas add up to the whole text and never show a half character", () => {
  const text = "naïve café: 3€, 😀 and ｆｕｌｌ width — done";
  const { s, deltas } = streamAll(bytesOf(text), []);
  expect(deltas.join("")).toBe(text);
  expect(s.value).toBe(text);
  for (const d of deltas) expect(d).not.toContain("\ufffd");
});

test("a stop string is cut even when it spans tokens and a multi-byte character", () => {
  const { s, deltas } = streamAll(bytesOf("xa€yz"), ["a€"]);
  expect(s.stopped).toBe(true);
  expect(deltas.join("")).toBe("x");
  expect(s.value).toBe("x");
});

test("a tail that may begin a stop string is held back until it cannot", () => {
  const s = new TextStream(decodeBytes, ["END"]);
  const ids = bytesOf("abcENx");
  const out = [1, 2, 3, 4, 5].map((n) => s.push(ids.slice(0, n)));
  expect(out.join("")).toBe("abc"); // "EN" might become "END"
  expect(s.push(ids)).toBe("ENx");
  expect(s.stopped).toBe(false);
});

test("the earliest of several stop strings wins, and nothing after it is emitted", () => {
  const { s, deltas } = streamAll(bytesOf("one two three"), ["three", "two"]);
  expect(s.stopped).toBe(true);
  expect(deltas.join("")).toBe("one ");
});

test("each push decodes a few ids, not the whole generation", () => {
  let decoded = 0;
  const counting = (ids: number[]) => {
    decoded += ids.length;
    return decodeBytes(ids);
  };
  const ids = bytesOf("lorem ipsum dolor sit amet ".repeat(200)); // 5400 tokens
  const { deltas } = streamAll(ids, ["never here"], counting);
  expect(deltas.join("")).toBe(decodeBytes(ids));
  // Quadratic decoding would pass ~14.6 million ids; a window of a token or two passes ~4 per push.
  expect(decoded).toBeLessThan(8 * ids.length);
});

test("a decoder that drops the leading space of its first word streams the same text as a whole decode", () => {
  // SentencePiece style: "▁" marks a space, and the decoded text never starts with one.
  const vocab = ["▁Hello", "▁world", ",", "▁how", "▁are", "▁you", "?"];
  const decode = (ids: number[]) => ids.map((i) => vocab[i]).join("").replace(/▁/g, " ").replace(/^ /, "");
  const ids = [0, 1, 2, 3, 4, 5, 6];
  const streamed = streamAll(ids, [], decode).deltas.join("");
  expect(streamed).toBe(decode(ids));
  expect(streamed).toBe("Hello world, how are you?");
});

// A SentencePiece-style decoder: "▁" is a space, and the decoded text's one leading space is
// stripped (tokenizer.json's Strip decoder), so a token decoded alone loses it.
const pieces = ["<s>", "▁Once", "▁upon", "▁a", "▁time", "▁there", "▁was", "▁king", "."];
const decodeSp = (ids: number[]) => ids.map((i) => (i === 0 ? "" : pieces[i])).join("").replace(/▁/g, " ").replace(/^ /, "");

test("the prompt's last tokens are decoding context: the first generated word keeps its leading space", () => {
  const prompt = [0, 1, 2, 3, 4];
  const generated = [5, 6, 3, 7, 8];
  const run = (context: number[]) => {
    const s = new TextStream(decodeSp, [], context);
    let out = "";
    for (let n = 1; n <= generated.length; n++) out += s.push(generated.slice(0, n));
    return out + s.flush();
  };
  expect(run(prompt.slice(-5))).toBe(" there was a king.");
  expect(decodeSp(prompt) + run(prompt.slice(-5))).toBe(decodeSp([...prompt, ...generated]));
  // Without context the decoder strips it, which is what the context is for.
  expect(run([])).toBe("there was a king.");
  // A stop string that begins with that space matches.
  const s = new TextStream(decodeSp, [" there"], prompt);
  expect(s.push([5])).toBe("");
  expect(s.stopped).toBe(true);
});

test("a stop string inside text held back to the end (an incomplete character) is still cut at flush", () => {
  // Token 1 is "ab"; token 2 is "STOP" and the first byte of "é", so its text stays pending.
  const tokenBytes = [bytesOf("ab"), [...bytesOf("STOP"), 0xc3]];
  const decode = (ids: number[]) => utf8.decode(Uint8Array.from(ids.flatMap((i) => tokenBytes[i])));
  const s = new TextStream(decode, ["STOP"]);
  expect(s.push([0])).toBe("ab");
  expect(s.push([0, 1])).toBe("");
  expect(s.stopped).toBe(false);
  expect(s.flush()).toBe("");
  expect(s.stopped).toBe(true);
  expect(s.value).toBe("ab");
});
