"""The card's measured rates, for the roofline: device-to-device copy bandwidth (bytes read plus
written per second) and a large bf16 GEMM's TFLOP/s. Prints one JSON line."""
import json
import subprocess

import torch


def median_ms(fn, reps=5, inner=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / inner)
    times.sort()
    return times[len(times) // 2]


n = 1 << 30
x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
copy_ms = median_ms(lambda: y.copy_(x))
del x, y
m = 8192
a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
gemm_ms = median_ms(lambda: a @ b)
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "card": torch.cuda.get_device_name(0),
    "driver": driver,
    "memoryGB": torch.cuda.get_device_properties(0).total_memory / 1e9,
    "copyGBps": 2 * n / (copy_ms / 1e3) / 1e9,
    "bf16Tflops": 2 * m ** 3 / (gemm_ms / 1e3) / 1e12,
}))
