// Two projects: "cpu" runs everywhere (CI included); "gpu" runs on a machine with an NVIDIA GPU
// (npm run test:gpu, one file at a time: the memory checks read the device's free memory, which
// test files running in parallel processes would move) and reports itself skipped, loudly, where there is none.
const common = {
  preset: "ts-jest",
  testEnvironment: "node",
  transform: { "^.+\\.ts$": ["ts-jest", { tsconfig: "test/tsconfig.json" }] },
  // The benchmark's node-llama-cpp install (scripts/bench/llama-peer/prepare.sh) holds a copy of
  // scripts/bench/llama-peer/package.json, whose name jest's module map would see twice.
  modulePathIgnorePatterns: ["<rootDir>/.llama-peer/"],
};
module.exports = {
  testTimeout: 120000,
  globalSetup: "<rootDir>/test/helpers/global-setup.js",
  globalTeardown: "<rootDir>/test/helpers/global-teardown.js",
  projects: [
    { ...common, displayName: "cpu", testMatch: ["<rootDir>/test/cpu/**/*.test.ts"] },
    { ...common, displayName: "gpu", testMatch: ["<rootDir>/test/gpu/**/*.test.ts"], globalSetup: "<rootDir>/test/helpers/gpu-setup.js" },
  ],
};
