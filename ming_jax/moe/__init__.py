"""Mixture of experts as small pure stages: router -> dispatch (sort by expert) -> grouped experts -> combine."""
