#pragma once
// Human rendering of moatd's JSON answers for moatctl: arrays of objects
// become aligned tables, objects become titled sections, scalars key: value.
#include <string>

#include <nlohmann/json.hpp>

namespace moat {

std::string render_human(const nlohmann::ordered_json& data);

}  // namespace moat
