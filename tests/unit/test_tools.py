"""The benchmark's generated config stays valid as the reference config evolves."""

import yaml

from libs.config import load_config
from tools.bench import BENCH_MODEL, bench_config


def test_bench_config_is_a_valid_config(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench_config("http://127.0.0.1:1")))
    config = load_config(path, environ={})
    assert config.routing.default_chain == [BENCH_MODEL]
    assert config.models[BENCH_MODEL].provider == "fake"
    assert BENCH_MODEL in config.ledger.prices
