"""Peak host memory of LLaDA.from_pretrained on a synthetic bf16 checkpoint in the real layout.

    python benchmarks/load_rss.py [--gb 1.2] [--dir /tmp/llada-synthetic]

Writes a random checkpoint of about --gb gigabytes (6 shards, index), then loads it in a fresh
process per case and prints peak RSS against the file size. Loading streams tensor by tensor from
each shard, so the peak is the loaded model plus about one shard's pages, never two copies.
"""
import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.2, help="approximate checkpoint size in GB")
    ap.add_argument("--dir", default="/tmp/llada-synthetic", help="where to write the checkpoint")
    ap.add_argument("--child", nargs=2, metavar=("DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    from extras.files import save_pretrained
    from model import LLaDA, LLaDAConfig
    if args.child:
        t0 = time.time()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = LLaDA.from_pretrained(args.dir, device=args.child[0], dtype=getattr(torch, args.child[1]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"RESULT {args.child[0]} {args.child[1]} model_bytes={n} peak_rss_kb={peak} "
              f"rss_before_load_kb={base} seconds={time.time() - t0:.1f}")
        return
    layers = max(1, int(args.gb * 2**30 / 2 / 12.6e6))                   # 12.6 M parameters per block
    cfg = LLaDAConfig(d_model=1024, n_heads=8, n_kv_heads=8, n_layers=layers, mlp_hidden_size=2816,
                      vocab_size=32768, embedding_size=32768, mask_token_id=32000,
                      eos_token_id=1, pad_token_id=1)
    path = Path(args.dir)
    if not (path / "config.json").exists():
        with torch.device("meta"):
            n = sum(p.numel() for p in LLaDA(cfg).parameters())
        model = LLaDA(cfg).to(torch.bfloat16)
        save_pretrained(model, path, max_shard_bytes=n * 2 // 6 + 1)
        del model
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint {path}: {size / 2**30:.2f} GiB on disk")
    cases = [("cpu", "bfloat16"), ("cpu", "float32")]
    cases += [("cuda", "bfloat16")] if torch.cuda.is_available() else []
    for device, dtype in cases:
        out = subprocess.run([sys.executable, __file__, "--dir", str(path), "--child", device, dtype],
                             capture_output=True, text=True, check=True).stdout
        line = next(l for l in out.splitlines() if l.startswith("RESULT"))
        f = dict(kv.split("=") for kv in line.split()[3:])
        peak = int(f["peak_rss_kb"]) * 1024
        print(f"{device:5s} {dtype:9s} peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f} x file size "
              f"(model in host memory: {int(f['model_bytes']) / 2**30 if device == 'cpu' else 0:.2f} GiB, "
              f"{f['seconds']} s)")


if __name__ == "__main__":
    main()
