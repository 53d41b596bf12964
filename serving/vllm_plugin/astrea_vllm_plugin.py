"""vLLM plugin for Astrea: its four vision experts stay whole under tensor parallelism.

vLLM's Transformers modeling backend rewrites every attention module it recognises (q, k and v projections of one
input) into a head-sharded fused projection, the vision towers' as well as the LLM's. Astrea's experts do not
survive that with more than one rank: Swin's relative-position bias is built for all of its heads while each rank
computes only its share (measured: a shape error in the tagger's Swin), BERT's self-attention in Grounding DINO
projects its output in another module, so nothing gathers the shards, and modules that do not state their head
size are split by the LLM's. The experts are a small part of the model at every scale; this plugin keeps them
replicated on every rank (their linear layers, norms and convolutions are still swapped for vLLM's replicated
ones) and leaves the LLM to vLLM's tensor parallelism.

Installed beside vLLM (`make install-serve` does; elsewhere `pip install serving/vllm_plugin`), vLLM loads it in
every process through the `vllm.general_plugins` entry point. It touches a private vLLM API
(`vllm.model_executor.models.transformers.fuser.Fusers`, vLLM 0.32) and does nothing where that is missing.
"""

import logging

logger = logging.getLogger(__name__)

#: The base model class whose `experts` stay whole (matched by name: its code is the model folder's remote code).
MODEL_CLASS = "AstreaModel"


def replicated_modules(model) -> set[int]:
    """ids of the modules that vLLM must not fuse: every module inside an Astrea model's experts."""
    if type(model).__name__ != MODEL_CLASS or not hasattr(model, "experts"):
        return set()
    return {id(module) for module in model.experts.modules()}


def register() -> None:
    try:
        from vllm.model_executor.models.transformers import fuser
    except ImportError:  # another vLLM layout: nothing to patch
        logger.warning("astrea-vllm-plugin: vLLM has no transformers fuser module; experts are left to vLLM")
        return
    fusers = fuser.Fusers
    if getattr(fusers, "_astrea_patched", False):
        return
    original_init, original_getitem = fusers.__init__, fusers.__getitem__

    def __init__(self, model, vllm_config):
        original_init(self, model, vllm_config)
        self.astrea_replicated = replicated_modules(model)

    def __getitem__(self, module):
        if id(module) in getattr(self, "astrea_replicated", ()):
            return []  # no fusion: vLLM then replaces the module's leaves (linear, norm, conv) with replicated ones
        return original_getitem(self, module)

    fusers.__init__, fusers.__getitem__ = __init__, __getitem__
    fusers._astrea_patched = True
