"""A tiny bench matrix (resnet20, 1 epoch on a few CIFAR-10 images) shared by the bench and GPU-session tests."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_matrix_text(methods, latency="{batch_sizes: [1, 2], warmup: 1, repeats: 2, rounds: 2}") -> str:
    """Matrix YAML named ``tiny``; ``methods`` maps each method name to its model.attention."""
    lines = "\n".join(f"  - {{name: {name}, overrides: {{model.attention: {attn}}}}}" for name, attn in methods.items())
    return f"""
name: tiny
overrides:
  device: cpu
  model.name: resnet20
  data.subset: 8
  data.val_size: 20
  data.test_subset: 5
  data.cache_dir: {ROOT / '.cache' / 'attnlab'}
  train.epochs: 1
  train.batch_size: 32
  train.eval_batch_size: 256
methods:
{lines}
seeds: [0]
latency: {latency}
"""
