"""Chat formats for model files that carry no chat template.

A chat template normally comes with the tokenizer (``tokenizer_config.json``, or a GGUF's
``tokenizer.chat_template``). The bundled Gemma 3 270M GGUF is the base model and has none,
but every Gemma speaks one turn format: ``<start_of_turn>ROLE\\nTEXT<end_of_turn>\\n`` with
the assistant's role spelled ``model``, no system role (a system message is folded into the
first user turn), and ``<end_of_turn>`` ending a reply. This module writes that format as a
template, by model type, and names the token that ends a turn so the engine stops there.
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedTokenizerBase

_GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- set state = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set state.system = message['content'] ~ '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\\n' }}"
    "{%- if message['role'] == 'user' %}{{ state.system }}{% set state.system = '' %}{% endif -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)

# model_type -> (chat template, the token that ends a turn)
_FORMATS = {"gemma3_text": (_GEMMA_TURNS, "<end_of_turn>")}


def fill_in_chat_format(tokenizer: PreTrainedTokenizerBase, hf_config: PretrainedConfig) -> None:
    """Give ``tokenizer`` its family's chat template if its files carried none."""
    known = _FORMATS.get(hf_config.model_type)
    if known is not None and not tokenizer.chat_template:
        tokenizer.chat_template = known[0]


def turn_end_token_ids(tokenizer: PreTrainedTokenizerBase, hf_config: PretrainedConfig) -> set[int]:
    """The id of the token that ends a chat turn in this family, which generation stops at."""
    known = _FORMATS.get(hf_config.model_type)
    if known is None:
        return set()
    token_id = tokenizer.convert_tokens_to_ids(known[1])
    return {token_id} if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else set()
