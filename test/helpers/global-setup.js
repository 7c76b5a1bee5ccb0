// One temporary directory per jest run for the model directories tests write, so that the
// teardown removes this run's and not those of another run going on beside it. Workers start
// after this and inherit the variable.
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

module.exports = async () => {
  process.env.LCKV_TEST_TMP = fs.mkdtempSync(path.join(os.tmpdir(), "lckv-test-run-"));
};
