"""Both benchmark scripts run end to end in smoke mode (tiny shapes, CPU), so they cannot rot."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_scripts_smoke():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda script: subprocess.Popen(
      [sys.executable, os.path.join(REPO, "bench", script), "--smoke"], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  cpu, gpu = run("cpu_vs_peft.py"), run("gpu.py")  # at once: each is mostly one busy thread
  cpu_out, cpu_err = cpu.communicate(timeout=300)
  gpu_out, gpu_err = gpu.communicate(timeout=300)

  # cpu_vs_peft exits non-zero when the two first losses differ: the same computation ran
  assert cpu.returncode == 0, cpu_err[-3000:]
  assert "| ftjax (JAX) |" in cpu_out and "| transformers + PEFT (PyTorch) |" in cpu_out
  assert "ftjax / PEFT speed:" in cpu_out

  assert gpu.returncode == 0, gpu_err[-3000:]
  assert "| tiny | ftjax | nf4 (embed_on_host, remat offload) |" in gpu_out and "| tiny | peft | bf16 |" in gpu_out
  assert "| tiny | ftjax | bf16, 4 adapters x batch 1 |" in gpu_out  # several adapters, one step
  assert "| nf4 | tiny [128, 64] |" in gpu_out and "| int4 | tiny [128, 64] |" in gpu_out
  assert "Failed or skipped" not in gpu_out, gpu_out
  assert "still to be taken on a GPU" in gpu_out
