"""Every matplotlib figure of the product (spectra, maps, limits, reinterpretation)."""
