// Removes the temporary model directories tests wrote (jest may end its workers before their
// own exit handlers run).
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

module.exports = async () => {
  for (const d of fs.readdirSync(os.tmpdir())) {
    if (d.startsWith("lckv-test-")) fs.rmSync(path.join(os.tmpdir(), d), { recursive: true, force: true });
  }
};
