"""Building edge/classifier.wasm (`tasks.edge_build`): the committed binary is the build of the
committed weights, and the build is reproducible."""

from tasks.edge_build import WASM, build, sha256


def test_the_committed_wasm_is_the_build_of_the_committed_weights(tmp_path):
    rebuilt = build(out=tmp_path / "classifier.wasm")
    assert sha256(rebuilt) == sha256(WASM), "edge/classifier.wasm is stale: run python -m tasks.edge_build"
    assert sha256(build(out=tmp_path / "again.wasm")) == sha256(rebuilt)  # reproducible
