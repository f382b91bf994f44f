"""islet_imaging.synth"""
