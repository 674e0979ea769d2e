"""The instruction prompt of the description merger (the paper's Tg), shared by generation and fine-tuning.

`MergePrompt` turns one image's raw web text (Tr), synthetic caption (Ts) and detection tags into chat messages;
`render_chat` applies a tokenizer's chat template to them. `DescriptionMerger` (generation) and
`build_instruction_dataset` / `tokenize_conversation` (fine-tuning) both go through these two, so a fine-tuned
merger is trained on exactly the prompts it later sees.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PLACEHOLDERS = ("raw_text", "caption", "tags")

DEFAULT_SYSTEM_PROMPT = (
    "You write descriptions of images for training an image-text model. You are given what is known about one "
    "image and combine it into a single accurate description, without adding anything that is not known."
)

DEFAULT_TEMPLATE = """Merge the information below about one image into a single description of it.

Web text (written by a person, may be noisy, ungrammatical or incomplete): {raw_text}
Machine caption (describes what is visible, may be generic or partly wrong): {caption}
Detected objects and concepts: {tags}

Rules:
1. Keep every real-world detail of the web text that can describe the image: names of people, places, \
brands, events, titles, dates and numbers.
2. Correct the grammar and spelling of the web text, and leave out what says nothing about the image \
(file names, links, prices in shop listings, requests to buy or share).
3. Use the machine caption and the detected tags only to add visual details (objects, colours, actions, \
setting) that agree with each other and with the web text.
4. Do not add anything that none of the inputs supports. When the inputs disagree, trust the web text for facts \
and leave out the doubtful detail.
5. Answer with the description only: one or two fluent sentences, no lists, no quotes, no preamble."""


@dataclass(frozen=True)
class MergePrompt:
    """The merger's instruction: a system message and a user-message template.

    Args:
        system: the system message (`""` for none).
        template: the user message, a `str.format` template using any of `{raw_text}`, `{caption}` and `{tags}`
            (write literal braces as `{{` and `}}`).
        empty_raw_text: what `{raw_text}` becomes when an image has no (or only blank) raw text.
        empty_caption: what `{caption}` becomes when there is no caption.
        no_tags: what `{tags}` becomes when there are no tags.
        tag_separator: joins the tags.
    """

    system: str = DEFAULT_SYSTEM_PROMPT
    template: str = DEFAULT_TEMPLATE
    empty_raw_text: str = "(none: the image came without text; describe it from the caption and the tags)"
    empty_caption: str = "(none)"
    no_tags: str = "none"
    tag_separator: str = ", "

    def __post_init__(self):
        used = []
        for _, name, _, _ in string.Formatter().parse(self.template):
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                raise ValueError(
                    f"prompt template: unknown placeholder {{{name}}}; use {{raw_text}}, {{caption}} and {{tags}} "
                    "(write literal braces as {{ and }})"
                )
            used.append(name)
        if not used:
            raise ValueError("prompt template: it uses none of {raw_text}, {caption}, {tags}")

    def user_message(self, raw_text: str | None, caption: str | None, tags: Sequence[str] | str | None) -> str:
        """The user message for one image. Blank inputs are replaced by `empty_raw_text`, `empty_caption`,
        `no_tags`; a `tags` string is taken as one tag."""
        return self.template.format(
            raw_text=_clean(raw_text) or self.empty_raw_text,
            caption=_clean(caption) or self.empty_caption,
            tags=self.tag_separator.join(normalize_tags(tags)) or self.no_tags,
        )

    def messages(
        self,
        raw_text: str | None,
        caption: str | None,
        tags: Sequence[str] | str | None,
        target: str | None = None,
    ) -> list[dict]:
        """Chat messages for one image: system (if any), user, and the assistant's `target` when given."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.user_message(raw_text, caption, tags)})
        if target is not None:
            messages.append({"role": "assistant", "content": target})
        return messages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> MergePrompt:
        """Read a prompt file: a `.json` object with any of the fields (`system`, `template`, `empty_raw_text`,
        `empty_caption`, `no_tags`, `tag_separator`), or any other file whose whole text is the template (the
        default system message is kept)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path}: no such file")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() != ".json":
            return cls(template=text.strip())
        loaded = json.loads(text)
        known = {f.name for f in fields(cls)}
        if not isinstance(loaded, dict) or set(loaded) - known:
            raise ValueError(
                f"prompt file {path}: expected a JSON object with keys among {sorted(known)}"
                + (f"; unknown: {sorted(set(loaded) - known)}" if isinstance(loaded, dict) else "")
            )
        return cls(**loaded)


def _clean(text) -> str:
    return " ".join(text.split()) if isinstance(text, str) else ""


def normalize_tags(tags) -> list[str]:
    """Tags as a list of non-blank strings (a string is one tag; None is no tags); duplicates dropped."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    seen, out = set(), []
    for tag in tags:
        tag = _clean(tag)
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def _folded_system(conversation: list[dict]) -> list[dict]:
    """The system message merged into the first user message, for chat templates without a system role."""
    if not conversation or conversation[0]["role"] != "system":
        return conversation
    system, rest = conversation[0]["content"], [dict(m) for m in conversation[1:]]
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system}\n\n{message['content']}"
            break
    return rest


def render_chat(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    """Apply `tokenizer`'s chat template to each conversation, returning the strings (tokenize them with
    `add_special_tokens=False`: templates write their own BOS).

    Templates that reject the system role (they raise while rendering) get the system message prepended to the
    first user message instead, for every conversation, so that the decision never depends on the batch.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat "
            "template: use an instruction-tuned (chat) model, or give a Jinja template as `chat_template` "
            "(`DescriptionMerger(..., chat_template=...)`, or `tokenizer.chat_template = ...`)"
        )
    try:
        return [
            tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=False)
            for c in conversations
        ]
    except Exception as error:  # jinja2's TemplateError from `raise_exception(...)` in the template
        if not any(c and c[0]["role"] == "system" for c in conversations):
            raise
        first_error = error
    try:
        return [
            tokenizer.apply_chat_template(
                _folded_system(c), add_generation_prompt=add_generation_prompt, tokenize=False
            )
            for c in conversations
        ]
    except Exception:
        raise first_error from None


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TEMPLATE",
    "PLACEHOLDERS",
    "MergePrompt",
    "normalize_tags",
    "render_chat",
]
