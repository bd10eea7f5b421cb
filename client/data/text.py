"""Text site data: reports or narratives with labels in, token ids out.

Only the declared columns are kept (a patient's name in another column never enters
the model's inputs). Texts are tokenised here, at the site, with the base model's own
tokenizer, and padded on the right to ``max_tokens``. Records that cannot serve are
rejected with a reason: no label, an unknown label, no person id, an empty text, a text
over ``max_characters``, or (with ``overlong = "reject"``) over ``max_tokens``. Texts cut
to ``max_tokens`` are kept and counted. The site's report shows every count; the texts
themselves are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from transformers import PreTrainedTokenizerBase

from client.data import Rejection, SiteData
from client.data.table_reader import read_columns
from client.data.tabular import reason_summary, screen_rows
from common.config import TextDataConfig
from common.errors import DataError
from common.tasks.text import TEXT_INPUTS

logger = logging.getLogger(__name__)

INPUT_IDS, ATTENTION_MASK = TEXT_INPUTS
EMPTY_TEXT = "text is empty"


@dataclass(frozen=True)
class Tokenised:
    """Right-padded token ids and masks for the texts that could be used."""

    input_ids: npt.NDArray[np.int64]
    attention_mask: npt.NDArray[np.int64]
    reasons: list[str | None]
    """Per input text: why it was rejected, or None when it was tokenised."""
    cut: npt.NDArray[np.bool_]
    """Per input text: kept, but cut to max_tokens."""

    @property
    def kept(self) -> npt.NDArray[np.bool_]:
        """Per input text: whether it was tokenised (a row of the arrays)."""
        return np.array([reason is None for reason in self.reasons], dtype=bool)

    def truncated_of(self, accepted: npt.NDArray[np.bool_]) -> int:
        """Cut texts among the ``accepted`` records (per input text)."""
        return int((self.cut & accepted).sum())

    def features(self) -> dict[str, npt.NDArray[np.generic]]:
        return {INPUT_IDS: self.input_ids, ATTENTION_MASK: self.attention_mask}


def text_of(value: object) -> str | None:
    """The cell as text; None for a missing cell (NaN, None)."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def tokenise(
    texts: Sequence[str | None],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_tokens: int,
    max_characters: int,
    overlong: str = "truncate",
) -> Tokenised:
    """Tokenise ``texts`` to at most ``max_tokens`` ids each, padded with the tokenizer's
    pad id; reject empty ones and, as configured, over-long ones."""
    reasons: list[str | None] = []
    usable: list[str] = []
    for text in texts:
        reason = None
        if text is None or not text.strip():
            reason = EMPTY_TEXT
        elif len(text) > max_characters:
            reason = f"text is over-long (more than data.max_characters = {max_characters})"
        reasons.append(reason)
        if reason is None and text is not None:
            usable.append(text)
    encoded: list[list[int]] = (
        tokenizer(usable, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if usable
        else []
    )
    pad = tokenizer.pad_token_id
    if pad is None:
        raise DataError("the base model's tokenizer has no pad token")
    rows: list[list[int]] = []
    cut = np.zeros(len(texts), dtype=bool)
    position = iter(encoded)
    for index, reason in enumerate(reasons):
        if reason is not None:
            continue
        ids = next(position)
        if not ids:
            reasons[index] = EMPTY_TEXT + " (no tokens)"
            continue
        if len(ids) > max_tokens:
            if overlong == "reject":
                reasons[index] = f"text is over-long (more than data.max_tokens = {max_tokens})"
                continue
            cut[index] = True
            ids = ids[:max_tokens]
        rows.append(ids)
    input_ids = np.full((len(rows), max_tokens), pad, dtype=np.int64)
    attention_mask = np.zeros((len(rows), max_tokens), dtype=np.int64)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return Tokenised(input_ids, attention_mask, reasons, cut)


def load_text_dataset(
    config: TextDataConfig, salt: bytes, tokenizer: PreTrainedTokenizerBase
) -> SiteData:
    """Read, screen and tokenise the site's texts (``config.path`` already resolved)."""
    declared = [
        (config.text_column, "data.text_column"),
        (config.label_column, "data.label_column"),
    ]
    if config.person_column is not None:
        declared.append((config.person_column, "data.person_column"))
    frame = read_columns(config, declared)
    rows = len(frame)
    if rows == 0:
        raise DataError("the text file has no records")
    labels, persons, rejected = screen_rows(frame, config, salt)
    texts = [text_of(value) for value in frame[config.text_column]]
    tokenised = tokenise(
        texts,
        tokenizer,
        max_tokens=config.max_tokens,
        max_characters=config.max_characters,
        overlong=config.overlong,
    )
    by_row = {rejection.record: rejection for rejection in rejected}
    for index, reason in enumerate(tokenised.reasons):
        if reason is None:
            continue
        record = f"row {index + 1}"
        earlier = by_row.get(record)
        by_row[record] = Rejection(record, f"{earlier.reason}; {reason}" if earlier else reason)
    accepted = np.array([label is not None for label in labels], dtype=bool) & tokenised.kept
    all_rejected = [by_row[f"row {i + 1}"] for i in range(rows) if f"row {i + 1}" in by_row]
    if not accepted.any():
        raise DataError(
            f"no usable records: all {rows} were rejected ({reason_summary(all_rejected)})"
        )
    # Tokenised rows are in input order; keep those whose label and person are usable too.
    usable_tokens = accepted[tokenised.kept]
    features: dict[str, npt.NDArray[Any]] = {
        name: values[usable_tokens] for name, values in tokenised.features().items()
    }
    truncated = tokenised.truncated_of(accepted)
    data = SiteData(
        features=features,
        labels=np.array([label for label, keep in zip(labels, accepted, strict=True) if keep]),
        person_keys=[key for key, keep in zip(persons, accepted, strict=True) if keep],
        classes=list(config.classes),
        rejected=all_rejected,
        adjusted={f"text cut to data.max_tokens = {config.max_tokens} tokens": truncated}
        if truncated
        else {},
    )
    if all_rejected:
        logger.warning(
            "%d of %d records rejected (%s)", len(all_rejected), rows, reason_summary(all_rejected)
        )
    if truncated:
        logger.warning(
            "%d texts were longer than data.max_tokens = %d tokens and were cut to it",
            truncated,
            config.max_tokens,
        )
    logger.info(
        "text data ready: %d records accepted from %d persons; %d cut to %d tokens; "
        "label counts %s",
        data.accepted,
        data.persons,
        truncated,
        config.max_tokens,
        list(data.label_counts().values()),
    )
    return data
