"""Input pipelines behind one interface: `loaders.make_loaders(data_cfg, shard, plan, ...)` returns `types.Loaders`.

Backends: `synthetic` (random tensors, for throughput), `pytorch` (PIL + DataLoader) and, imported only when
chosen, `dali-cpu` / `dali-gpu` (the default where DALI is installed). The package itself imports nothing, so
DALI's reader processes, which import `order` and `dali_source`, start without torch.
"""
