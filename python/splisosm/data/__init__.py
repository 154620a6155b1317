"""AnnData intake (checks, filters, gene tables), designs, feature summaries and simulated data."""

from splisosm.data.simulation import simulate_isoform_data

__all__ = ["simulate_isoform_data"]
