-- Where each server's data lives (`[[servers]] region`), written from the config at start:
-- placement by region, and the region a tenant lives in, read as its server's.
ALTER TABLE servers ADD COLUMN region text;
