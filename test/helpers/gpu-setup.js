// The GPU project's setup: says plainly, once, when its tests will be skipped and why.
const path = require("node:path");

module.exports = async () => {
  let why;
  try {
    const addon = require("node-gyp-build")(path.join(__dirname, "..", ".."));
    if (!addon.backends.cuda) why = addon.backends.cudaBuilt ? addon.backends.cudaProblem : "this build of lckv has no CUDA backend";
  } catch (e) {
    why = `the addon did not load (${e.message})`;
  }
  if (why) process.stderr.write(`\nlckv: GPU tests SKIPPED (${why}); run them with 'npm run test:gpu' on a machine with an NVIDIA GPU.\n`);
};
