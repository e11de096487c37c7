"""Model URIs as a person writes them: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, to a version."""

from __future__ import annotations

from tlops.errors import TlopsError


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` to (name, version)."""
    from mlflow.exceptions import MlflowException

    from tlops.registry.store import client

    if not uri.startswith("models:/"):
        raise TlopsError(f"--model {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    rest = uri[len("models:/") :]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            try:
                return name, str(client().get_model_version_by_alias(name, alias).version)
            except MlflowException as exc:
                from tlops.tracking import unreachable_error

                if unreachable_error(exc) is not None:
                    raise
                raise _unknown_alias(uri, name, alias) from None
        name, _, version = rest.partition("/")
        if not version:
            raise TlopsError(f"--model {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return name, str(client().get_model_version(name, version).version)
    except MlflowException as exc:
        from tlops.tracking import unreachable_error

        raise (unreachable_error(exc) or TlopsError(f"--model {uri}: no such model version in the registry")) from None


def _unknown_alias(uri: str, name: str, alias: str) -> Exception:
    """Why ``models:/NAME@ALIAS`` names no version: the model, or the alias, is not there (with the aliases
    that are, and the closest one); a registry that does not answer is said as such by the caller."""
    import difflib

    from mlflow.exceptions import MlflowException

    from tlops.registry.store import client

    try:
        aliases = sorted((client().get_registered_model(name).aliases or {}).keys())
    except MlflowException as exc:
        from tlops.tracking import unreachable_error

        return unreachable_error(exc) or TlopsError(f"--model {uri}: registered model {name!r} does not exist "
                                                    "in the MLflow registry")
    close = difflib.get_close_matches(alias, aliases, n=1)
    hint = f"; did you mean @{close[0]}?" if close else ""
    return TlopsError(f"--model {uri}: no alias {alias!r} on model {name}; aliases: "
                      f"{', '.join(aliases) or 'none yet'}{hint}")
