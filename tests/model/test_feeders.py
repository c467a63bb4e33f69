"""model.feeders through model.decode_check: jump-forward on each ChatGLM double (loaded through trust_remote_code,
as a user's ChatGLM directory is) gives, token for token, the answers of HF generate() one token per pass
under the same rules, in fewer passes; and the check's CLI passes on the causal tiny model."""

from __future__ import annotations

import pytest
import torch

from core.dataset import CLASSIFICATION, DEV_FILE, EXTRACTION, read_jsonl
from model import decode_check
from model.load import load_merged
from tests.doubles.build import DOUBLES
from tests.model.decoding_support import assert_jump_forward_equals_generate, favour_triples


@pytest.mark.slow
@pytest.mark.legacy_lane
@pytest.mark.parametrize("kind", DOUBLES)
def test_chatglm_jump_forward_gives_the_answers_of_generate(kind, double_merged, small_data):
    lm = load_merged(double_merged(kind), device="cpu")
    assert_jump_forward_equals_generate(lm, read_jsonl(small_data / DEV_FILE))


def test_decode_check_cli_passes_on_the_causal_model(merged_model, data_dir, capsys):
    reports = decode_check.main(["--model", str(merged_model), "--data", str(data_dir / DEV_FILE), "--n", "6",
                                 "--device", "cpu"])
    assert [r["task"] for r in reports] == [CLASSIFICATION, EXTRACTION]
    assert all(r["identical"] == r["n"] == 6 for r in reports)
    assert '"identical": 6' in capsys.readouterr().out


def test_same_rules_processor_finds_a_feeder_that_lies(merged_model, data_dir, monkeypatch):
    """The check can fail: a feeder that loses its cache (each pass sees only the tokens it feeds, as if mask and
    positions were wrong) gives other answers than generate()."""
    from model import feeders

    lm = load_merged(merged_model, device="cpu")
    texts = [ex.text for ex in read_jsonl(data_dir / DEV_FILE) if ex.task == EXTRACTION][:6]
    original = feeders.CausalFeeder.forward

    def forgetful(self, ids, mask, past):
        if past is None:
            return original(self, ids, mask, past)
        logits, _ = original(self, ids, mask[:, -ids.shape[1] :], None)
        return logits, original(self, ids, mask, past)[1]

    monkeypatch.setattr(feeders.CausalFeeder, "forward", forgetful)
    hook = favour_triples(lm)
    try:
        report = decode_check.compare(lm, texts, EXTRACTION, batch_size=3)
    finally:
        hook.remove()
    assert report["identical"] < report["n"]


class TwoLayouts(torch.nn.Module):
    """A stand-in model whose output layer gets (batch, seq, hidden) or, like THUDM's v1, (seq, batch, hidden)."""

    def __init__(self, seq_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.seq_first = seq_first
        self.head_saw = []
        self.head.register_forward_hook(lambda module, args, out: self.head_saw.append(tuple(args[0].shape)))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        hidden = self.embed(input_ids).cumsum(1)  # each position depends on the ones before it
        if self.seq_first:
            return self.head(hidden.transpose(0, 1)).transpose(0, 1)
        return self.head(hidden)


@pytest.mark.parametrize("seq_first", [False, True])
def test_only_the_last_position_goes_through_the_output_layer(seq_first):
    from model.feeders import last_position_only

    model = TwoLayouts(seq_first)
    ids = torch.randint(0, 50, (3, 7))
    full = model(ids)
    with last_position_only(model, *ids.shape):
        cut = model(ids)
    assert cut.shape == (3, 1, 50)
    assert torch.allclose(cut[:, -1], full[:, -1], atol=1e-6)
    assert model.head_saw[-1] == ((1, 3, 8) if seq_first else (3, 1, 8))
    model(ids)  # the hook is gone afterwards
    assert model.head_saw[-1] == ((7, 3, 8) if seq_first else (3, 7, 8))


def test_a_square_batch_is_not_cut_because_its_layout_cannot_be_told():
    from model.feeders import last_position_only

    model = TwoLayouts(seq_first=True)
    ids = torch.randint(0, 50, (4, 4))
    with last_position_only(model, *ids.shape):
        assert model(ids).shape == (4, 4, 50)
