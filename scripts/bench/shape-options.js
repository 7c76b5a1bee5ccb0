/**
 * The command-line options of a model's shape, shared by the scripts that write random models
 * (make-random-model.js: a Hugging Face directory; make-gguf.js: a GGUF file). TinyLlama-1.1B's
 * shape by default.
 */
function addShapeOptions(command, positionsHelp) {
  return command
    .option("--layers <n>", "layers", "22")
    .option("--hidden <n>", "hidden size", "2048")
    .option("--heads <n>", "attention heads", "32")
    .option("--kv-heads <n>", "K/V heads", "4")
    .option("--intermediate <n>", "MLP size", "5632")
    .option("--vocab <n>", "vocabulary size", "32000")
    .option("--seed <n>", "random seed", "1")
    .option("--max-positions <n>", positionsHelp, "16384");
}

module.exports = { addShapeOptions };
