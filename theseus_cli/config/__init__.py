"""Every YAML schema (pydantic v2, ``extra="forbid"``): the conversion recipe and the transport recipe, read safely
and validated with every problem reported at once."""

from theseus_cli.config.recipe import Recipe, load_recipe, parse_recipe
from theseus_cli.config.transport import TransportRecipe, load_transport_recipe

__all__ = ["Recipe", "TransportRecipe", "load_recipe", "load_transport_recipe", "parse_recipe"]
