"""Prompt templates and the defect knowledge base, both YAML package data."""

from kka_synth.prompts.knowledge import (
    KNOWLEDGE_FILES,
    SEVERITY_LADDER,
    SIZE_LADDER,
    CategoryKnowledge,
    DefectKnowledge,
    KnowledgeError,
    all_knowledge,
    load_knowledge,
    load_knowledge_file,
)
from kka_synth.prompts.templates import TemplateError, chat_messages, render_prompt

__all__ = [
    "KNOWLEDGE_FILES",
    "SEVERITY_LADDER",
    "SIZE_LADDER",
    "CategoryKnowledge",
    "DefectKnowledge",
    "KnowledgeError",
    "TemplateError",
    "all_knowledge",
    "chat_messages",
    "load_knowledge",
    "load_knowledge_file",
    "render_prompt",
]
