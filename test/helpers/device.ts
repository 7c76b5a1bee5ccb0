/** The load options that put a test's models on one backend (the serving suites run on both). */
export interface TestDevice {
  device: "cpu" | "cuda";
  dtype?: "f32" | "bf16";
}
