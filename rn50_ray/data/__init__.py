"""Input pipelines behind one interface: `loaders.make_loaders(cfg, shard, plan, dataset, ...)` returns
`core.context.Loaders`.

A data folder is listed and screened once per version (`manifest.py`); every command and every worker reads
that listing (`checks.py`). Backends: `synthetic` (random tensors, for throughput), `pytorch` (PIL +
DataLoader) and, imported only when chosen, `dali-cpu` / `dali-gpu` (the default where DALI is installed).
The package itself imports nothing.
"""
