"""Builds one provider adapter per configured provider."""

from __future__ import annotations

from libs.config import Config
from services.gateway.providers.base import Provider
from services.gateway.providers.local import LocalProvider


def build_providers(config: Config) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, settings in config.providers.items():
        if settings.type == "local":
            providers[name] = LocalProvider(name, config.services.inference.address, config.clients)
        elif settings.type == "openai":
            from services.gateway.providers.openai import OpenAICompatibleProvider

            providers[name] = OpenAICompatibleProvider(name, settings)
        else:
            from services.gateway.providers.anthropic import AnthropicProvider

            providers[name] = AnthropicProvider(name, settings)
    return providers
