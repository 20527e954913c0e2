"""Transcriptions of reference code (guided-diffusion) that tests compare our library against."""
