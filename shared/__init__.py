"""The one copy of what every step needs: config, model sources, sampling, the API, the Engine protocol."""
