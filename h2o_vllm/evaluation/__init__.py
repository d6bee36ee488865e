"""Quality of eviction policies measured through an OpenAI-compatible endpoint (``h2o-vllm eval``).

scenarios: what is asked; configs: which policy and budget each request carries;
client: concurrent requests; metrics and report: scores and HELM-style tables.
"""
