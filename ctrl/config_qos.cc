// qos.shaping (class trees per egress port) and qos.police (ingress meters)
// of moatd's config. Errors carry file:line:col; a shaper with an error is
// left out as a whole (a half tree would shape wrongly), the rest stay.
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <set>

#include "ctrl/config_qos.hh"
#include "ctrl/config_reader.hh"

namespace moat {

std::optional<uint64_t> parse_rate(const std::string& s) {
  // tc's units: bit/kbit/mbit/gbit are bits per second (decimal prefixes),
  // bps/kbps/mbps/gbps bytes per second. A bare number is ambiguous: refused.
  static const std::map<std::string, double> units = {
      {"bit", 1.0 / 8},  {"kbit", 1e3 / 8}, {"mbit", 1e6 / 8}, {"gbit", 1e9 / 8},
      {"bps", 1.0},      {"kbps", 1e3},     {"mbps", 1e6},     {"gbps", 1e9}};
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) i++;
  if (i == 0 || i == s.size()) return std::nullopt;
  auto u = units.find(s.substr(i));
  if (u == units.end()) return std::nullopt;
  double v;
  try {
    v = std::stod(s.substr(0, i));
  } catch (...) {
    return std::nullopt;
  }
  double bytes = v * u->second;
  if (!(bytes >= 1) || bytes > 1e12) return std::nullopt;
  return uint64_t(std::llround(bytes));
}

std::string rate_str(uint64_t bytes_per_s) {
  double bits = double(bytes_per_s) * 8;
  if (bits >= 1e9) return fmt::format("{:g}gbit", bits / 1e9);
  if (bits >= 1e6) return fmt::format("{:g}mbit", bits / 1e6);
  if (bits >= 1e3) return fmt::format("{:g}kbit", bits / 1e3);
  return fmt::format("{:g}bit", bits);
}

namespace {

void rate(Reader& r, const YAML::Node& n, const std::string& what, uint64_t& out) {
  auto v = n.IsScalar() ? parse_rate(n.Scalar()) : std::nullopt;
  if (!v) r.error(n, fmt::format("{}: \"{}\" is not a rate (e.g. 128kbit, 9.6kbit, 10mbit, 1gbit; kbps = kilobytes/s)", what,
                                 n.IsScalar() ? n.Scalar() : std::string()));
  else out = *v;
}

// Bytes: a number, or with kb/mb (1024-based, as tc).
void size(Reader& r, const YAML::Node& n, const std::string& what, uint32_t& out) {
  std::string s = n.IsScalar() ? n.Scalar() : std::string();
  uint64_t mul = 1;
  if (s.size() > 2 && (s.ends_with("kb") || s.ends_with("mb"))) {
    mul = s.ends_with("kb") ? 1024 : 1024 * 1024;
    s.resize(s.size() - 2);
  }
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos || s.size() > 9 ||
      std::stoull(s) * mul > (1u << 30) || std::stoull(s) == 0) {
    r.error(n, fmt::format("{}: expected a size in bytes (1 to 1gb; e.g. 1600, 16kb)", what));
    return;
  }
  out = uint32_t(std::stoull(s) * mul);
}

// A key the mapping had (a default-constructed YAML::Node is a defined null).
bool given(const YAML::Node& n) { return n.IsDefined() && !n.IsNull(); }

struct ClassNode {
  qos::ClassSpec spec;
  std::string parent;
};

// One class entry: {name, parent, rate, ceil, burst, cburst, prio, queue, drop}.
bool read_class(Reader& r, const YAML::Node& n, const std::string& where, bool allow_parent, ClassNode& out) {
  size_t before = r.errors();
  bool have_rate = false, have_ceil = false;
  std::set<std::string> keys = {"name", "rate", "ceil", "burst", "cburst", "prio", "queue", "drop"};
  if (allow_parent) keys.insert("parent");
  r.fields(n, where.c_str(), keys, [&](const std::string& k, const YAML::Node& v) {
    if (k == "name") {
      if (auto s = r.str(v, (where + ".name").c_str())) out.spec.name = *s;
    } else if (k == "parent") {
      if (auto s = r.str(v, (where + ".parent").c_str())) out.parent = *s;
    } else if (k == "rate") {
      rate(r, v, where + ".rate", out.spec.rate);
      have_rate = true;
    } else if (k == "ceil") {
      rate(r, v, where + ".ceil", out.spec.ceil);
      have_ceil = true;
    } else if (k == "burst") {
      size(r, v, where + ".burst", out.spec.burst);
    } else if (k == "cburst") {
      size(r, v, where + ".cburst", out.spec.cburst);
    } else if (k == "prio") {
      r.uint(v, (where + ".prio").c_str(), out.spec.prio, 0, 7);
    } else if (k == "queue") {
      r.uint(v, (where + ".queue").c_str(), out.spec.limit, 1, 65536);
    } else if (k == "drop") {
      auto s = r.str(v, (where + ".drop").c_str());
      if (s && *s == "tail") out.spec.drop = qos::DropPolicy::tail;
      else if (s && *s == "codel") out.spec.drop = qos::DropPolicy::codel;
      else if (s) r.error(v, fmt::format("{}.drop: \"{}\" is not tail or codel", where, *s));
    }
  });
  if (n.IsMap() && out.spec.name.empty()) r.error(n, fmt::format("{}: missing \"name\"", where));
  if (n.IsMap() && !have_rate) r.error(n, fmt::format("{} {}: missing \"rate\"", where, out.spec.name));
  // HTB's default: a class without a ceiling does not borrow.
  if (!have_ceil) out.spec.ceil = out.spec.rate;
  return r.errors() == before;
}

// Turns named classes into a plan (parents by name, defined above their
// children) and checks it; errors at the class's node.
bool build_plan(Reader& r, const YAML::Node& list_node, const std::vector<ClassNode>& nodes,
                const std::vector<YAML::Node>& yn, const std::string& where, qos::Plan& plan,
                bool subtree = false) {
  size_t before = r.errors();
  std::map<std::string, int32_t> index;
  for (auto& c : plan.classes) index[c.name] = int32_t(index.size());
  for (size_t i = 0; i < nodes.size(); i++) {
    const ClassNode& cn = nodes[i];
    if (index.count(cn.spec.name)) {
      r.error(yn[i], fmt::format("{}: class \"{}\" defined twice", where, cn.spec.name));
      continue;
    }
    qos::ClassSpec s = cn.spec;
    if (cn.parent.empty()) {
      s.parent = 0;
    } else if (auto it = index.find(cn.parent); it != index.end()) {
      s.parent = it->second;
    } else {
      r.error(yn[i], fmt::format("{}: class \"{}\" has parent \"{}\", which is not defined above it", where, s.name,
                                 cn.parent));
      continue;
    }
    index[s.name] = int32_t(plan.classes.size());
    plan.classes.push_back(s);
  }
  if (r.errors() != before) return false;
  // A moat's subtree is checked as a tree of its own; its top may borrow
  // (ceil above rate), unlike a link.
  qos::Plan check = plan;
  if (subtree) check.classes[0].ceil = check.classes[0].rate;
  for (const qos::PlanError& e : qos::validate(check)) {
    if (e.cls > 0 && size_t(e.cls) - 1 < yn.size() && plan.classes.size() == nodes.size() + 1)
      r.error(yn[e.cls - 1], fmt::format("{}: class \"{}\": {}", where, plan.classes[e.cls].name, e.what));
    else
      r.error(list_node, fmt::format("{}: {}", where, e.what));
  }
  return r.errors() == before;
}

bool is_leaf(const qos::Plan& p, const std::string& name) {
  int32_t idx = -1;
  for (size_t i = 0; i < p.classes.size(); i++)
    if (p.classes[i].name == name) idx = int32_t(i);
  if (idx < 0) return false;
  for (auto& c : p.classes)
    if (c.parent == idx) return false;
  return true;
}

std::string first_leaf(const qos::Plan& p, size_t from) {
  for (size_t i = from; i < p.classes.size(); i++)
    if (is_leaf(p, p.classes[i].name)) return p.classes[i].name;
  return {};
}

void read_shaper(Reader& r, const YAML::Node& n, Config& c) {
  size_t before = r.errors();
  ShaperConfig sc;
  sc.line = n.Mark().line + 1;
  YAML::Node classes_node, default_node, dscp_node, moats_node, port_node;
  uint64_t link = 0;
  uint32_t link_burst = 0;
  r.fields(n, "qos.shaping", {"port", "rate", "burst", "classes", "default", "dscp", "moats"},
           [&](const std::string& k, const YAML::Node& v) {
    if (k == "port") {
      port_node = v;
      if (auto s = r.str(v, "qos.shaping.port")) sc.port = *s;
    } else if (k == "rate") {
      rate(r, v, "qos.shaping.rate", link);
    } else if (k == "burst") {
      size(r, v, "qos.shaping.burst", link_burst);
    } else if (k == "classes") {
      classes_node = v;
    } else if (k == "default") {
      default_node = v;
    } else if (k == "dscp") {
      dscp_node = v;
    } else if (k == "moats") {
      moats_node = v;
    }
  });
  if (!n.IsMap()) return;
  if (sc.port.empty()) return r.error(n, "qos.shaping: missing \"port\"");
  if (!c.port(sc.port)) return r.error(port_node, fmt::format("qos.shaping: no port named \"{}\"", sc.port));
  for (auto& o : c.shapers)
    if (o.port == sc.port)
      return r.error(port_node, fmt::format("qos.shaping: port {} already shaped at line {}", sc.port, o.line));
  if (!link) return r.error(n, fmt::format("qos.shaping {}: missing \"rate\" (the link's)", sc.port));
  std::string where = fmt::format("qos.shaping {}", sc.port);
  qos::ClassSpec root;
  root.name = sc.port;
  root.rate = root.ceil = link;
  root.burst = root.cburst = link_burst;
  sc.plan.classes.push_back(root);
  if (given(classes_node)) {
    std::vector<ClassNode> nodes;
    std::vector<YAML::Node> yn;
    r.list(classes_node, (where + ".classes").c_str(), [&](const YAML::Node& e) {
      ClassNode cn;
      if (read_class(r, e, where + " class", true, cn)) {
        nodes.push_back(cn);
        yn.push_back(e);
      }
    });
    if (r.errors() != before) return;
    if (!build_plan(r, classes_node, nodes, yn, where, sc.plan)) return;
  }
  if (given(moats_node)) {
    sc.moats = true;
    ClassNode moat;
    YAML::Node mclasses, mdefault;
    moat.spec.name = "moat";
    r.fields(moats_node, (where + ".moats").c_str(), {"parent", "rate", "ceil", "burst", "cburst", "prio", "classes", "default"},
             [&](const std::string& k, const YAML::Node& v) {
      if (k == "parent") {
        if (auto s = r.str(v, "moats.parent")) sc.moats_parent = *s;
      } else if (k == "rate") {
        rate(r, v, where + ".moats.rate", moat.spec.rate);
      } else if (k == "ceil") {
        rate(r, v, where + ".moats.ceil", moat.spec.ceil);
      } else if (k == "burst") {
        size(r, v, where + ".moats.burst", moat.spec.burst);
      } else if (k == "cburst") {
        size(r, v, where + ".moats.cburst", moat.spec.cburst);
      } else if (k == "prio") {
        r.uint(v, "moats.prio", moat.spec.prio, 0, 7);
      } else if (k == "classes") {
        mclasses = v;
      } else if (k == "default") {
        mdefault = v;
      }
    });
    if (r.errors() != before) return;
    if (!moat.spec.rate) return r.error(moats_node, fmt::format("{}.moats: missing \"rate\" (each moat's guarantee)", where));
    if (!moat.spec.ceil) moat.spec.ceil = moat.spec.rate;
    if (!sc.moats_parent.empty()) {
      bool found = false;
      for (auto& cl : sc.plan.classes) found |= cl.name == sc.moats_parent;
      if (!found) return r.error(moats_node["parent"], fmt::format("{}.moats: no class named \"{}\"", where, sc.moats_parent));
    }
    sc.moat.classes.push_back(moat.spec);
    sc.moat.classes[0].parent = -1;
    if (given(mclasses)) {
      std::vector<ClassNode> nodes;
      std::vector<YAML::Node> yn;
      r.list(mclasses, (where + ".moats.classes").c_str(), [&](const YAML::Node& e) {
        ClassNode cn;
        if (read_class(r, e, where + ".moats class", true, cn)) {
          nodes.push_back(cn);
          yn.push_back(e);
        }
      });
      if (r.errors() != before) return;
      if (!build_plan(r, mclasses, nodes, yn, where + ".moats", sc.moat, true)) return;
    }
    if (given(mdefault)) {
      auto s = r.str(mdefault, "moats.default");
      if (s && !is_leaf(sc.moat, *s)) return r.error(mdefault, fmt::format("{}.moats.default: \"{}\" is not a leaf class of the moats", where, *s));
      if (s) sc.moat_default = *s;
    } else {
      sc.moat_default = first_leaf(sc.moat, 0);
    }
  }
  if (given(default_node)) {
    auto s = r.str(default_node, "qos.shaping.default");
    if (s && !is_leaf(sc.plan, *s)) return r.error(default_node, fmt::format("{}.default: \"{}\" is not a leaf class", where, *s));
    if (s) sc.default_leaf = *s;
  } else {
    // The first leaf of the tree: none when only moats hang from the root.
    sc.default_leaf = sc.plan.classes.size() > 1 ? first_leaf(sc.plan, 1) : "";
  }
  if (given(dscp_node)) {
    if (!dscp_node.IsMap()) return r.error(dscp_node, fmt::format("{}.dscp: expected DSCP: class, e.g. {{ef: audio}}", where));
    for (auto it = dscp_node.begin(); it != dscp_node.end(); ++it) {
      auto d = dscp_value(it->first.Scalar());
      if (!d) {
        r.error(it->first, fmt::format("{}.dscp: \"{}\" is not a DSCP (0-63, ef, afXY, csN)", where, it->first.Scalar()));
        continue;
      }
      const std::string& leaf = it->second.IsScalar() ? it->second.Scalar() : std::string();
      bool moat_leaf = sc.moats && is_leaf(sc.moat, leaf);
      if (!is_leaf(sc.plan, leaf) && !moat_leaf)
        r.error(it->second, fmt::format("{}.dscp: \"{}\" is not a leaf class", where, leaf));
      else
        sc.dscp[*d] = leaf;
    }
  }
  if (r.errors() != before) return;
  c.shapers.push_back(std::move(sc));
}

void read_police(Reader& r, const YAML::Node& n, Config& c) {
  PoliceConfig pc;
  pc.line = n.Mark().line + 1;
  size_t before = r.errors();
  bool have_rate = false;
  r.fields(n, "qos.police", {"class", "rate", "peak", "burst", "peak_burst", "exceed"},
           [&](const std::string& k, const YAML::Node& v) {
    if (k == "class") {
      if (auto s = r.str(v, "qos.police.class")) pc.cls = *s;
      if (std::find(c.rules.classes.begin(), c.rules.classes.end(), pc.cls) == c.rules.classes.end())
        r.error(v, fmt::format("qos.police: no class named \"{}\" (declare it in qos.classes)", pc.cls));
    } else if (k == "rate") {
      rate(r, v, "qos.police.rate", pc.cir);
      have_rate = true;
    } else if (k == "peak") {
      rate(r, v, "qos.police.peak", pc.pir);
    } else if (k == "burst") {
      size(r, v, "qos.police.burst", pc.cbs);
    } else if (k == "peak_burst") {
      size(r, v, "qos.police.peak_burst", pc.pbs);
    } else if (k == "exceed") {
      auto s = r.str(v, "qos.police.exceed");
      if (s && *s == "drop") {
        pc.yellow_drop = true;
      } else if (s && *s == "pass") {
      } else if (s && s->starts_with("mark ") && dscp_value(s->substr(5))) {
        pc.yellow_dscp = *dscp_value(s->substr(5));
      } else if (s) {
        r.error(v, fmt::format("qos.police.exceed: \"{}\" is not pass, drop or \"mark DSCP\"", *s));
      }
    }
  });
  if (!n.IsMap()) return;
  if (pc.cls.empty()) r.error(n, "qos.police: missing \"class\"");
  if (!have_rate) r.error(n, "qos.police: missing \"rate\"");
  if (!pc.pir) pc.pir = pc.cir;
  if (pc.pir < pc.cir) r.error(n, fmt::format("qos.police {}: peak below rate", pc.cls));
  // Buffers for at least one full-size packet, else nothing ever passes.
  if (!pc.cbs) pc.cbs = std::max<uint32_t>(3000, uint32_t(pc.cir / 50));
  if (!pc.pbs) pc.pbs = std::max<uint32_t>(pc.cbs, uint32_t(pc.pir / 50));
  for (auto& o : c.police)
    if (o.cls == pc.cls) r.error(n, fmt::format("qos.police: class {} already policed at line {}", pc.cls, o.line));
  if (r.errors() == before) c.police.push_back(pc);
}

}  // namespace

void read_qos(Reader& r, const YAML::Node& qos, Config& c) {
  if (!qos.IsMap()) return;
  if (auto n = qos["shaping"]) r.list(n, "qos.shaping", [&](const YAML::Node& e) { read_shaper(r, e, c); });
  if (auto n = qos["police"]) r.list(n, "qos.police", [&](const YAML::Node& e) { read_police(r, e, c); });
}

}  // namespace moat
