"""SemanticCache: a response cache per tenant and scope, in Redis, with an exact and a semantic layer.

Modules: `keys` (Redis key layout), `entries` (entries in Redis, the source of truth), `guards` and
`lexicon` (the false-hit guards), `index` (FAISS per scope partition), `semantic` (the index's entries and
the judge that decides on candidates), `sync` (rebuild at start-up, following other replicas), `domain`
(the `Cache` facade the servicer calls), `embedder` (the model behind the micro-batcher), `metrics`.
Design and figures: docs/semantic-cache.md.
"""
