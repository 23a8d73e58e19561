#pragma once
// Human rendering of moatd's JSON answers for moatctl (pure: no I/O).
//   array of objects  -> aligned table, header from the keys in order of
//                        first appearance; numeric columns right-aligned
//   object            -> scalars as "key: value" lines, arrays and objects
//                        as sections titled "key:" and indented two spaces
//   array of scalars  -> one per line; empty array or object -> "(none)"
// Keys keep their order because both ends use nlohmann::ordered_json.
#include <string>

#include <nlohmann/json.hpp>

namespace moat {

std::string render_human(const nlohmann::ordered_json& data);

// Columns a string occupies on a terminal, counting UTF-8 code points (no
// wide-character tables: names here are ASCII in practice). Exposed so
// tests measure alignment the way the renderer means it.
size_t display_width(const std::string& s);

}  // namespace moat
