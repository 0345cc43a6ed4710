import pytest

from hip_attn import HiPConfig


def test_defaults_follow_the_design():
    cfg = HiPConfig()
    assert (cfg.k, cfg.block_size_q, cfg.block_size_k, cfg.query_pool_stride) == (512, 64, 8, 1)
    assert (cfg.sink_tokens, cfg.window, cfg.head_sharing) == (64, 256, "kv_group")
    # the setting that finds what dense attention finds on SmolLM2 (issue 13, README)
    assert (cfg.beam, cfg.leaf_scores) == (2, "keys")
    assert cfg.blocks_per_query_block == 64
    assert cfg.replace(k=1024).blocks_per_query_block == 128


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"k": 100}, "k"),
        ({"k": 0}, "k"),
        ({"block_size_k": 6}, "block_size_k"),
        ({"block_size_q": 8}, "block_size_q"),
        ({"block_size_q": 48}, "block_size_q"),
        ({"query_pool_stride": 3}, "query_pool_stride"),
        ({"sink_tokens": 10}, "sink_tokens"),
        ({"window": 16}, "window"),
        ({"beam": 0}, "beam"),
        ({"refresh_interval": 300}, "refresh_interval"),
        ({"refresh_interval": 0}, "refresh_interval"),
        ({"head_sharing": "group"}, "head_sharing"),
        ({"leaf_scores": "exact"}, "leaf_scores"),
        ({"dense_threshold": -1}, "dense_threshold"),
        ({"window": 10**26}, "window"),  # beyond int32 token positions, not an OverflowError
        ({"dense_threshold": 2**31}, "dense_threshold"),
        ({"dense_layers": (1, -2)}, "dense_layers"),
    ],
)
def test_invalid_fields_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"HiPConfig.{field}"):
        HiPConfig(**changes)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="HiPConfig.k"):
        HiPConfig(k=64.0)
    with pytest.raises(TypeError, match="HiPConfig.window"):
        HiPConfig(window=True)
    with pytest.raises(TypeError, match="HiPConfig.dense_threshold"):
        HiPConfig(dense_threshold=1.5)


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    cfg = HiPConfig(k=np.int64(1024), dense_threshold=np.int32(0), dense_layers=np.arange(2))
    assert cfg == HiPConfig(k=1024, dense_threshold=0, dense_layers=(0, 1))
    assert type(cfg.k) is int and type(cfg.dense_layers[1]) is int


def test_frozen_and_serializable():
    cfg = HiPConfig(dense_layers=[0, 3])
    assert cfg.dense_layers == (0, 3)
    assert cfg.to_dict()["k"] == 512
    with pytest.raises(AttributeError):
        cfg.k = 8
