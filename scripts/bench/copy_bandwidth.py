"""Device-to-device copy bandwidth (bytes read + written per second), the memory roofline's rate."""
import torch

n = 1 << 30
x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
times = []
for _ in range(5):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    times.append(s.elapsed_time(e) / 1e3 / 10)
times.sort()
print(f"{2 * n / times[len(times) // 2] / 1e9:.1f}")
