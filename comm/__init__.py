"""Communication for expert parallelism: ``comm.all_to_all`` (dispatch/combine, DeepEP's API,
any backend). Depends only on ``ops`` and torch."""

__all__ = ["all_to_all"]
