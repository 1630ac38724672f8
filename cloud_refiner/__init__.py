"""The edgefleet cloud refiner: classifies crops from the fleet with a larger model."""
