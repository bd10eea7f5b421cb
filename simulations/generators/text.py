"""Synthetic texts for the text task: radiology reports at hospitals and customer
narratives at banks, each labelled ``routine`` or ``urgent`` (a triage classifier).

Urgent reports describe a critical finding and urgent narratives an unauthorised
transaction or a stolen card; routine texts share most of their wording, including the
negated findings ("no pneumothorax"), so a model must read more than one word. Labels
are flipped for a few records (``label_noise``), as triage in practice is never clean.
The vocabulary of every template is public: the demo tokenizer is built from it, never
from a site's data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

TEXT_CLASSES = ["routine", "urgent"]
LABEL_COLUMN = "triage"
TEXT_COLUMNS = {"hospital": "report", "bank": "narrative"}
PERSON_COLUMNS = {"hospital": "patient_id", "bank": "customer_id"}
NAME_COLUMN = "name"
"""An identifying column the site config does not declare: it is never read."""

_REPORT_HISTORY = [
    "chest pain",
    "shortness of breath",
    "fall from standing height",
    "follow up of known nodule",
    "fever and cough",
    "abdominal pain",
    "headache after minor trauma",
    "routine preoperative assessment",
]
_REPORT_TECHNIQUE = [
    "frontal and lateral views of the chest",
    "ct of the head without contrast",
    "ct of the abdomen and pelvis with contrast",
    "mri of the lumbar spine",
    "ct angiography of the chest",
]
_REPORT_ROUTINE = [
    "the lungs are clear",
    "no focal consolidation",
    "no pleural effusion",
    "no pneumothorax",
    "heart size is within normal limits",
    "no acute intracranial hemorrhage",
    "no evidence of pulmonary embolism",
    "mild degenerative changes of the spine",
    "stable postoperative changes",
    "no displaced fracture",
    "the appendix is normal",
    "no free air",
    "small stable nodule unchanged from prior study",
]
_REPORT_URGENT = [
    "large right pneumothorax with mediastinal shift",
    "acute intracranial hemorrhage with midline shift",
    "filling defect in the right main pulmonary artery consistent with embolism",
    "free air under the diaphragm concerning for perforation",
    "displaced fracture of the femoral neck",
    "new spiculated mass in the left upper lobe",
    "dilated appendix with surrounding inflammation",
    "intimal flap in the ascending aorta consistent with dissection",
]
_REPORT_IMPRESSION = {
    "routine": ["no acute findings", "unremarkable study", "stable appearance"],
    "urgent": [
        "critical result communicated to the referring physician",
        "findings discussed with the emergency team",
        "see findings above",
    ],
}
_NARRATIVE_OPENING = [
    "hello",
    "good morning",
    "dear customer service",
    "hi team",
    "to whom it may concern",
]
_NARRATIVE_ROUTINE = [
    "please update my mailing address",
    "i have a question about my monthly statement",
    "i would like to increase my credit limit",
    "thank you for resolving the fee on my account",
    "can you send me a new checkbook",
    "i want to set up automatic payments for my loan",
    "i noticed a small fee on my statement and would like an explanation",
    "please close my old savings account",
    "my card payment at the grocery store went through twice but the merchant refunded it",
]
_NARRATIVE_URGENT = [
    "i did not authorize this transaction on my card",
    "my card was stolen yesterday and there are charges i did not make",
    "someone accessed my online account and changed my password",
    "there is an unknown transfer from my account to an overseas merchant",
    "i want to report fraud on my account immediately",
    "a caller pretending to be the bank took my card details and money is missing",
]
_NARRATIVE_CLOSING = [
    "thank you",
    "please call me back",
    "kind regards",
    "i look forward to your answer",
    "this needs attention today",
]


def _words(phrases: list[str]) -> list[str]:
    return [word for phrase in phrases for word in re.findall(r"\w+|[^\w\s]", phrase)]


def public_vocabulary() -> list[str]:
    """Every word the generator can write, in a fixed order (the tokenizer's words)."""
    phrases = [
        *_REPORT_HISTORY,
        *_REPORT_TECHNIQUE,
        *_REPORT_ROUTINE,
        *_REPORT_URGENT,
        *(text for texts in _REPORT_IMPRESSION.values() for text in texts),
        *_NARRATIVE_OPENING,
        *_NARRATIVE_ROUTINE,
        *_NARRATIVE_URGENT,
        *_NARRATIVE_CLOSING,
        "clinical history : technique : findings : impression : . ,",
    ]
    return list(dict.fromkeys(_words(phrases)))


def _pick(rng: np.random.Generator, options: list[str], count: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=count, replace=False)]


def radiology_report(rng: np.random.Generator, urgent: bool) -> str:
    findings = _pick(rng, _REPORT_ROUTINE, int(rng.integers(2, 5)))
    if urgent:
        findings.insert(int(rng.integers(0, len(findings) + 1)), _pick(rng, _REPORT_URGENT)[0])
    impression = _pick(rng, _REPORT_IMPRESSION["urgent" if urgent else "routine"])[0]
    return (
        f"CLINICAL HISTORY: {_pick(rng, _REPORT_HISTORY)[0]}. "
        f"TECHNIQUE: {_pick(rng, _REPORT_TECHNIQUE)[0]}. "
        f"FINDINGS: {'. '.join(findings)}. IMPRESSION: {impression}."
    )


def customer_narrative(rng: np.random.Generator, urgent: bool) -> str:
    body = _pick(rng, _NARRATIVE_ROUTINE, int(rng.integers(1, 3)))
    if urgent:
        body.insert(int(rng.integers(0, len(body) + 1)), _pick(rng, _NARRATIVE_URGENT)[0])
    opening, closing = _pick(rng, _NARRATIVE_OPENING)[0], _pick(rng, _NARRATIVE_CLOSING)[0]
    return f"{opening}, {'. '.join(body)}. {closing}."


def write_texts(
    path: Path,
    *,
    kind: Literal["hospital", "bank"],
    people: int,
    seed: int,
    urgent_rate: float = 0.4,
    label_noise: float = 0.05,
    empty_texts: int = 0,
    overlong_texts: int = 0,
    file_format: Literal["csv", "parquet", "jsonl"] = "csv",
) -> Path:
    """Write one site's texts (1-3 per person) with a name column nobody declares;
    ``empty_texts`` blank records and ``overlong_texts`` runaway ones (a report pasted
    many times over) exercise the loader's reporting."""
    rng = np.random.default_rng(seed)
    write = radiology_report if kind == "hospital" else customer_narrative
    rows = []
    for person in range(people):
        for _ in range(int(rng.integers(1, 4))):
            urgent = bool(rng.random() < urgent_rate)
            text = write(rng, urgent)
            label = urgent != bool(rng.random() < label_noise)
            rows.append(
                {
                    PERSON_COLUMNS[kind]: f"{kind[0].upper()}{seed % 1000:03d}-{person:05d}",
                    NAME_COLUMN: f"Person {seed}-{person}",
                    TEXT_COLUMNS[kind]: text,
                    LABEL_COLUMN: TEXT_CLASSES[int(label)],
                }
            )
    for index in rng.choice(len(rows), size=min(empty_texts, len(rows)), replace=False):
        rows[int(index)][TEXT_COLUMNS[kind]] = "   " if index % 2 else ""
    for index in rng.choice(len(rows), size=min(overlong_texts, len(rows)), replace=False):
        rows[int(index)][TEXT_COLUMNS[kind]] = " ".join([rows[int(index)][TEXT_COLUMNS[kind]]] * 12)
    frame = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "csv":
        frame.to_csv(path, index=False)
    elif file_format == "parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
