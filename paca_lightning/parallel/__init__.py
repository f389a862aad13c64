"""PaCA under data parallelism and sharding, in plain torch (no Lightning).

- **FSDP2** (`shard_paca_model`, `attach_column_sync`): see `paca_lightning.parallel.fsdp2`.
- **Sharded loading** (`sharded_paca_model`): build on meta, shard, fill shards from safetensors;
  see `paca_lightning.parallel.loading`.
- **FSDP1** (`use_delta_form`, `replicate_trainable`): see `paca_lightning.parallel.fsdp1`.
- **DDP**: every rank holds whole weights; PaCA's forward-time column write is already exact,
  so plain ``DistributedDataParallel`` needs nothing from here but the exports.
- **Exports** (`gather_adapter_state`, `save_sharded_adapter`, `merged_state_dict`,
  `export_merged`): collectives that gather shards or replicas; see `paca_lightning.parallel.export`.

The Lightning strategies built on these are in `paca_lightning.training.strategies`.
"""

from .export import clean_name, export_merged, gather_adapter_state, merged_state_dict, save_sharded_adapter
from .fsdp1 import DeltaFormPaCALinear, replicate_trainable, use_delta_form
from .fsdp2 import attach_column_sync, decoder_layers, paca_shard_placement, shard_paca_model
from .loading import apply_paca_on_meta, build_on_meta, load_pretrained_shards, sharded_paca_model

__all__ = ["shard_paca_model", "attach_column_sync", "paca_shard_placement", "decoder_layers", "use_delta_form",
           "DeltaFormPaCALinear", "replicate_trainable", "gather_adapter_state", "save_sharded_adapter",
           "merged_state_dict", "export_merged", "clean_name", "sharded_paca_model", "build_on_meta",
           "apply_paca_on_meta", "load_pretrained_shards"]
