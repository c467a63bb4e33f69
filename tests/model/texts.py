"""Reference texts for the labelling tests. Light on purpose: tests/model/test_label.py is also loaded by the
child processes its resume and locking tests start, and their timing assumes no torch import there."""

from __future__ import annotations

from core.dataset import load_split


def gbk_encodable_texts(data_dir, splits: tuple[str, ...]) -> list[str]:
    """The reference texts of `splits` that GBK can encode, so the same rows can be written in any encoding."""
    texts = []
    for split in splits:
        for example in load_split(data_dir, split):
            try:
                example.text.encode("gbk")
            except UnicodeEncodeError:
                continue
            texts.append(example.text.strip())
    return texts
