"""bench/common.py's decode byte and prefill FLOP accounting against hand computations (test-moe)."""
from bench.common import decode_bytes, prefill_flops
from mobilemoe.config import MobileMoEConfig


def int4(name, part, *shape):
    """An INT4 weight as the artifact stores it: uint32 codes [..., K // 8] + fp16 scales [..., K // 32]."""
    *lead, k = shape
    return {f"{name}__q4": ((*lead, k // 8), "U32", part), f"{name}__s": ((*lead, k // 32), "F16", part)}


def moe_params(cfg, tied=True):
    """test-moe's parameters under the TVM artifact's names (FuseExpertGateUp: w13 stacked), with the
    layer parts the manifest records (param_parts: by module and MoE operand role, not by name)."""
    H, E, I = cfg.hidden_size, cfg.num_experts, cfg.expert_hidden
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = {"p_model_norm_weight": ((H,), "F32", "norm"), **int4("p_model_lm_head_weight", "lm head", cfg.vocab_size, H)}
    if not tied:
        p.update(int4("p_model_embed_weight", "embedding", cfg.vocab_size, H))
    for i in range(cfg.num_layers):
        pre = f"p_model_layers_{i}_"
        p.update({f"{pre}attn_norm_weight": ((H,), "F32", "norm"), f"{pre}ffn_norm_weight": ((H,), "F32", "norm"),
                  f"{pre}moe_router_weight": ((E, H), "F32", "router"),
                  **int4(f"{pre}attn_wq_weight", "attention", q, H), **int4(f"{pre}attn_wk_weight", "attention", kv, H),
                  **int4(f"{pre}attn_wv_weight", "attention", kv, H), **int4(f"{pre}attn_wo_weight", "attention", H, q),
                  **int4(f"{pre}moe_shared_w1_weight", "shared expert", cfg.shared_expert_hidden, H),
                  **int4(f"{pre}moe_shared_w3_weight", "shared expert", cfg.shared_expert_hidden, H),
                  **int4(f"{pre}moe_shared_w2_weight", "shared expert", H, cfg.shared_expert_hidden),
                  **int4(f"{pre}moe_w13", "routed experts", E, 2 * I, H),
                  **int4(f"{pre}moe_w2", "routed experts", E, H, I)})
    return p


def test_decode_bytes_test_moe():
    cfg = MobileMoEConfig.from_name("test-moe")  # V 512, H 64, 2 layers, 4/2 heads of 16, 8 experts of 32 top-2
    b = decode_bytes(moe_params(cfg), cfg, ctx=100)
    # INT4 = 0.5 byte codes + 2/32 byte scales per weight = 0.5625 byte per weight
    attn = (64 * 64 * 2 + 64 * 32 * 2) * 0.5625          # 12288 weights -> 6912 bytes a layer
    shared = 3 * 64 * 64 * 0.5625                         # 6912
    routed = 8 * 3 * 64 * 32 * 0.5625 * 2 / 8             # 27648 stacked, top-2 of 8 -> 6912
    floats = (8 * 64 + 2 * 64) * 4                        # router + 2 norms: 2560
    head = 512 * 64 * 0.5625                              # tied LM head, read fully: 18432
    weights = 2 * (attn + shared + routed + floats) + head + 64 * 4 + head / 512  # + final norm + embedding row
    assert weights == 65316
    assert b["routed_experts"] == 2 * routed
    assert b["embedding_row"] == 36
    assert b["weights"] == weights
    assert b["kv_cache"] == 2 * 2 * 2 * 100 * 16 * 4  # K and V, layers, kv heads, ctx, head dim, fp32
    assert b["total"] == weights + 51200
    # mobilemoe.config counts the same weights but not the embedding row
    assert b["config_weights"] == cfg.int4_active_bytes() == weights - 36


def test_decode_bytes_untied_embedding_reads_one_row():
    cfg = MobileMoEConfig.from_name("test-moe")
    untied_cfg = cfg.replace(tie_embeddings=False)
    tied = decode_bytes(moe_params(cfg), cfg, ctx=1)
    untied = decode_bytes(moe_params(untied_cfg, tied=False), untied_cfg, ctx=1)
    assert untied["embedding_row"] == 512 * 64 * 0.5625 / 512
    assert untied["weights"] == tied["weights"]  # the embedding table adds one row, as the tied lookup did


def test_prefill_flops_counts_lm_head_once():
    cfg = MobileMoEConfig.from_name("test-moe")
    f = prefill_flops(cfg, 16)
    matmul = (64 * 64 * 2 + 64 * 32 * 2) * 2 + 8 * 64 * 2 + 2 * 3 * 64 * 32 * 2 + 3 * 64 * 64 * 2 + 512 * 64
    per_token = 2 * matmul + 4 * 2 * 4 * 16 * (16 + 1) / 2  # + QK^T and PV at (n+1)/2 keys on average
    assert f["config_x_tokens"] == 16 * per_token
    assert f["needed"] == 16 * (per_token - 2 * 512 * 64) + 2 * 512 * 64
