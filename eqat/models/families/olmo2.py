"""OLMo 2: Llama's linears, with the norms after attention and after the MLP (post-norm:
`post_attention_layernorm`, `post_feedforward_layernorm`), so no norm precedes q/k/v or gate/up
and SmoothQuant/QLLM have no site to fold into (they refuse it; RTN, Block-AP, E2E-QP, LR-QAT run)."""

from eqat.models.families.spec import FamilySpec, register_family

OLMO2 = register_family(FamilySpec(name="olmo2", model_types=("olmo2",),
                                   notes="post-norm blocks: no SmoothQuant/QLLM sites"))
